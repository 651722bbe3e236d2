/* The worker pool that shares each job's units (rows, tiles, spans) among threads. */
#include <pthread.h>

#include "kernels.h"

/* A pause in a spin loop (it frees the core's resources for its other hardware thread). */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *run(void *arg) {
    job_t *j = arg;
    for (;;) {
        const long step = j->chunk ? j->chunk : CHUNK;
        long r0 = __atomic_fetch_add(&j->next, step, __ATOMIC_RELAXED);
        if (r0 >= j->rows) return NULL;
        j->each(j->ctx, r0, r0 + step < j->rows ? r0 + step : j->rows);
    }
}

/* A pool of worker threads, started once: a decode step makes a few hundred calls, and
 * starting threads for each cost more than the small products themselves. Workers spin on
 * the job counter for a while (the next call usually comes within microseconds), then
 * sleep on a condition variable. The spin covers the gaps between decode steps (sampling,
 * Python); `pool_sleep` ends it at once, for when torch's own threads take over. */
enum { MAX_THREADS = 64, SPIN = 40000 }; /* a pause is ~25 ns here: ~1 ms of spinning */
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static job_t *pool_job;
static long pool_serial;  /* bumped for every job */
static int pool_wanted;   /* workers that should take part in the current job */
static int pool_started;
static int pool_busy;     /* workers still on the current job */
static long pool_first_serial[MAX_THREADS]; /* the serial before a worker's first job */
static int pool_quiet;    /* set by pool_sleep, cleared by the next job */

void pool_sleep(void) { __atomic_store_n(&pool_quiet, 1, __ATOMIC_RELEASE); }

static void *worker(void *arg) {
    int id = (int)(long)arg;
    long seen = pool_first_serial[id];
    for (;;) {
        long serial;
        int spins = 0;
        while ((serial = __atomic_load_n(&pool_serial, __ATOMIC_ACQUIRE)) == seen &&
               spins++ < SPIN && !__atomic_load_n(&pool_quiet, __ATOMIC_RELAXED))
            cpu_relax();
        if (serial == seen) {
            pthread_mutex_lock(&pool_lock);
            while ((serial = __atomic_load_n(&pool_serial, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&pool_wake, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
        }
        seen = serial;
        if (id < __atomic_load_n(&pool_wanted, __ATOMIC_ACQUIRE)) {
            run(__atomic_load_n(&pool_job, __ATOMIC_ACQUIRE));
            __atomic_fetch_sub(&pool_busy, 1, __ATOMIC_ACQ_REL);
        }
    }
    return NULL;
}

static void forget_pool(void);
static int no_fork_handler; /* pthread_atfork failed: no workers, a forked child would wait
                               for them */
static void register_fork_handler(void) {
    no_fork_handler = pthread_atfork(NULL, NULL, forget_pool) != 0;
}

static void forget_pool(void) { /* in a forked child, which has none of the workers */
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pool_started = pool_busy = 0;
}

void run_threads(job_t *job, int threads) {
    const long step = job->chunk ? job->chunk : CHUNK;
    long chunks = (job->rows + step - 1) / step;
    if (threads > chunks) threads = (int)chunks;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        run(job);
        return;
    }
    pthread_mutex_lock(&call_lock);
    pthread_mutex_lock(&pool_lock);
    while (pool_started < threads - 1) {
        if (pool_started == 0) {
            static pthread_once_t once_fork = PTHREAD_ONCE_INIT;
            pthread_once(&once_fork, register_fork_handler);
            if (no_fork_handler) break; /* the calling thread works alone */
        }
        pthread_t tid;
        pool_first_serial[pool_started] = pool_serial;
        if (pthread_create(&tid, NULL, worker, (void *)(long)pool_started) != 0)
            break; /* the job runs on the threads there are */
        pthread_detach(tid);
        pool_started++;
    }
    int helpers = threads - 1 < pool_started ? threads - 1 : pool_started;
    pool_job = job;
    pool_quiet = 0;
    pool_wanted = helpers;
    pool_busy = helpers;
    __atomic_fetch_add(&pool_serial, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run(job); /* the calling thread works too */
    while (__atomic_load_n(&pool_busy, __ATOMIC_ACQUIRE) > 0) cpu_relax();
    pthread_mutex_unlock(&call_lock);
}
