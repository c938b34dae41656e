/* Threads for the library's parallel parts: torch's OpenMP team when Python has handed it over
 * (below), otherwise a small persistent thread pool of our own (pthreads; we do not link an OpenMP
 * runtime: torch ships its own, and two runtimes in one process fight over the cores).
 *
 * lq_parallel(nparts, fn, arg) runs part 0 on the calling thread and parts 1.. on workers, which
 * are started on first use and kept. A worker that finds no new job spins for LQ_SPIN_NS (a decode
 * step calls the library hundreds of times a second, and waking a sleeping thread costs tens of
 * microseconds), then sleeps on a condition variable. Spinning threads call sched_yield() after
 * the first few microseconds, so that on an oversubscribed machine they hand their core to whoever
 * they are waiting for instead of burning its time slice. If another thread is already running a job,
 * the caller runs every part itself rather than wait. fn must split its work by the nparts it is
 * given, which is smaller than asked for when a thread could not be started. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define LQ_MAX_THREADS 256
#define LQ_SPIN_NS 30000

typedef struct {
    pthread_mutex_t job_lock; /* one job at a time */
    pthread_mutex_t mu;       /* protects sleeping workers */
    pthread_cond_t cv;
    _Atomic uint64_t ticket;  /* (generation << 16) | nparts of the current job */
    _Atomic int pending;      /* workers of the current job that have not finished */
    _Atomic int sleepers;
    lq_task_fn fn;
    void *arg;
    int started; /* workers started (ids 1..started) */
} lq_pool;

static lq_pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0,
                       NULL, NULL, 0};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define LQ_PAUSES 2048 /* busy-wait iterations before yielding */

static void relax(unsigned i) {
    if (i < LQ_PAUSES)
        cpu_relax();
    else
        sched_yield();
}

static uint64_t wait_for_new_ticket(uint64_t seen) {
    uint64_t t = atomic_load(&pool.ticket);
    if ((t >> 16) != (seen >> 16)) return t;
    const uint64_t deadline = now_ns() + LQ_SPIN_NS;
    for (unsigned i = 1;; i++) {
        t = atomic_load(&pool.ticket);
        if ((t >> 16) != (seen >> 16)) return t;
        relax(i);
        if ((i & 255u) == 0 && now_ns() > deadline) break;
    }
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.sleepers, 1);
    while (((t = atomic_load(&pool.ticket)) >> 16) == (seen >> 16)) pthread_cond_wait(&pool.cv, &pool.mu);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.mu);
    return t;
}

/* the ticket before the job that started worker i: a worker that starts late must still run it */
static uint64_t start_ticket[LQ_MAX_THREADS];

static void *worker_main(void *p) {
    const int id = (int)(intptr_t)p;
    uint64_t seen = start_ticket[id];
    for (;;) {
        seen = wait_for_new_ticket(seen);
        const int nparts = (int)(seen & 0xffffu);
        if (id < nparts) {
            pool.fn(pool.arg, id, nparts);
            atomic_fetch_sub(&pool.pending, 1);
        }
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has only the forking thread: forget the workers (they do not exist there) */
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleepers, 0);
    pool.started = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

static void run_inline(int nparts, lq_task_fn fn, void *arg) {
    for (int i = 0; i < nparts; i++) fn(arg, i, nparts);
}

/* ---- or torch's own OpenMP threads -------------------------------------------------------------
 * Between torch's operators its OpenMP workers spin-wait (libgomp's default), on the very cores our
 * workers need: inside a model the two pools took turns on the cores, and a small model's INT4
 * prefill ran at 0.5-0.6x the float model's. So, when Python hands us the entry points of the
 * OpenMP runtime torch has loaded (lq_set_openmp, kernels/cpu_native.py), parallel parts run as one
 * OpenMP parallel region on torch's team, as torch's own kernels do. GOMP_parallel is libgomp's ABI
 * for "#pragma omp parallel" (LLVM's and Intel's runtimes export it too). Inside another parallel
 * region it runs a team of one, which does every part. */
typedef void (*lq_gomp_parallel)(void (*fn)(void *), void *data, unsigned nthreads, unsigned flags);
static _Atomic(lq_gomp_parallel) omp_parallel;
static int (*omp_thread_num)(void), (*omp_num_threads)(void);

LQ_API int lq_set_openmp(void *gomp_parallel, void *get_thread_num, void *get_num_threads) {
    if (gomp_parallel && !(get_thread_num && get_num_threads)) return LQ_EINVAL;
    omp_thread_num = (int (*)(void))get_thread_num;
    omp_num_threads = (int (*)(void))get_num_threads;
    atomic_store(&omp_parallel, (lq_gomp_parallel)gomp_parallel); /* NULL: back to our pool */
    return LQ_OK;
}

typedef struct {
    lq_task_fn fn;
    void *arg;
    int nparts;
} omp_job;

static void omp_body(void *p) {
    const omp_job *j = (const omp_job *)p;
    const int n = omp_num_threads();
    for (int part = omp_thread_num(); part < j->nparts; part += n) j->fn(j->arg, part, j->nparts);
}

void lq_parallel(int nparts, lq_task_fn fn, void *arg) {
    if (nparts > LQ_MAX_THREADS) nparts = LQ_MAX_THREADS;
    if (nparts <= 1) {
        run_inline(nparts < 1 ? 1 : nparts, fn, arg);
        return;
    }
    const lq_gomp_parallel par = atomic_load(&omp_parallel);
    if (par) {
        omp_job j = {fn, arg, nparts};
        par(omp_body, &j, (unsigned)nparts, 0);
        return;
    }
    if (pthread_mutex_trylock(&pool.job_lock) != 0) {
        run_inline(nparts, fn, arg);
        return;
    }
    pthread_once(&atfork_once, install_atfork);
    while (pool.started < nparts - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_ticket[pool.started + 1] = atomic_load(&pool.ticket);
        const int ok = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(pool.started + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.started++;
    }
    const int workers = pool.started < nparts - 1 ? pool.started : nparts - 1;
    pool.fn = fn;
    pool.arg = arg;
    atomic_store(&pool.pending, workers);
    const uint64_t gen = (atomic_load(&pool.ticket) >> 16) + 1;
    atomic_store(&pool.ticket, (gen << 16) | (uint64_t)(workers + 1));
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(arg, 0, workers + 1);
    for (unsigned i = 1; atomic_load(&pool.pending) > 0; i++) relax(i);
    pthread_mutex_unlock(&pool.job_lock);
}
