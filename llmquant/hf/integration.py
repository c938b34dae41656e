"""transformers integration (filled in below)."""


def attach_quantization_config(model, config):
    model.config.quantization_config = config.to_dict()
