/* qgguf native core: ISA detection and dispatch, thread pool, public entry points. */
#define _GNU_SOURCE
#include "qg_native.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <limits.h>
#include <stdio.h>
#include <math.h>

#if defined(QG_X86)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() ((void)0)
#endif

#define QG_MAX_THREADS 256

/* ---------------------------------------------------------------- errors */
static _Thread_local char g_err[256];
const char *qg_last_error(void) { return g_err; }
static int fail(const char *msg) {
    snprintf(g_err, sizeof g_err, "%s", msg);
    return -1;
}

/* ---------------------------------------------------------------- ISA */
static const char *const isa_names[QG_ISA_COUNT] = {"scalar", "avx2", "avx512", "neon"};
const char *qg_isa_name(int isa) {
    return (isa >= 0 && isa < QG_ISA_COUNT) ? isa_names[isa] : "?";
}

int qg_isa_available(int isa) {
    switch (isa) {
    case QG_ISA_SCALAR: return 1;
#if defined(QG_X86)
    case QG_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case QG_ISA_AVX512:
        __builtin_cpu_init();
        return qg_isa_available(QG_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
               __builtin_cpu_supports("avx512vnni");
#endif
#if defined(QG_ARM64)
    case QG_ISA_NEON: return 1;
#endif
    default: return 0;
    }
}

int qg_best_isa(void) {
    for (int isa = QG_ISA_COUNT - 1; isa > 0; isa--)
        if (qg_isa_available(isa)) return isa;
    return QG_ISA_SCALAR;
}

static atomic_int g_isa = -1;
int qg_get_isa(void) {
    int isa = atomic_load(&g_isa);
    if (isa < 0) {
        isa = qg_best_isa();
        atomic_store(&g_isa, isa);
    }
    return isa;
}
int qg_set_isa(int isa) {
    if (!qg_isa_available(isa)) return fail("ISA not available on this CPU/build");
    atomic_store(&g_isa, isa);
    return 0;
}

static const qg_type_traits *traits_for(int type, int isa) {
    if (type < 0 || type >= QG_TYPE_COUNT) return NULL;
    switch (isa) {
    case QG_ISA_SCALAR: return &qg_traits_scalar[type];
#if defined(QG_X86)
    case QG_ISA_AVX2: return &qg_traits_avx2[type];
    case QG_ISA_AVX512: return &qg_traits_avx512[type];
#endif
#if defined(QG_ARM64)
    case QG_ISA_NEON: return &qg_traits_neon[type];
#endif
    default: return NULL;
    }
}

int qg_has_kernel(int type, int isa) {
    const qg_type_traits *tr = traits_for(type, isa);
    return tr && tr->vec_rows && tr->dequantize_rows;
}

/* ---------------------------------------------------------------- thread pool
 * Persistent workers; the caller is thread 0 and does its share whatever the workers do.
 * Tasks claim their work in chunks from atomic counters, so a worker that the OS schedules late
 * (a busy laptop, a shared machine) costs nothing: the caller does the work, and the job is
 * closed when the caller finishes, after which late workers skip it.  Workers spin for
 * QGGUF_NATIVE_SPIN_US microseconds (default 50) after a job, then sleep on a condition
 * variable.  One parallel job at a time (g_call). */
typedef void (*qg_task_fn)(void *arg, int ith, int nth);

#define JOB_CLOSED (1 << 30)
static pthread_mutex_t g_call = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_nworkers = 0;
static atomic_uint_fast64_t g_gen = 0;
static atomic_int g_state = JOB_CLOSED; /* JOB_CLOSED bit | number of workers inside the job */
static qg_task_fn g_fn;
static void *g_arg;
static int g_nth;
static long g_spin_ns = -1;

static long spin_ns(void) {
    if (g_spin_ns < 0) {
        const char *s = getenv("QGGUF_NATIVE_SPIN_US");
        long us = s ? atol(s) : 50;
        g_spin_ns = us < 0 ? 0 : us * 1000;
    }
    return g_spin_ns;
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

typedef struct { int idx; uint64_t gen; } worker_arg;
static void *worker_main(void *p) {
    const int idx = ((worker_arg *)p)->idx; /* this worker runs thread index idx+1 */
    uint64_t seen = ((worker_arg *)p)->gen; /* the generation before its first job */
    free(p);
    for (;;) {
        uint64_t gen = atomic_load_explicit(&g_gen, memory_order_acquire);
        if (gen == seen) {
            const long limit = spin_ns();
            long t0 = now_ns();
            for (unsigned i = 1; limit > 0; i++) {
                cpu_relax();
                gen = atomic_load_explicit(&g_gen, memory_order_acquire);
                if (gen != seen) break;
                if ((i & 255) == 0 && now_ns() - t0 > limit) break;
            }
            if (gen == seen) {
                pthread_mutex_lock(&g_m);
                while ((gen = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_cv, &g_m);
                pthread_mutex_unlock(&g_m);
            }
        }
        seen = gen;
        /* join the job unless the caller already closed it */
        int s = atomic_load_explicit(&g_state, memory_order_acquire);
        while (!(s & JOB_CLOSED) &&
               !atomic_compare_exchange_weak_explicit(&g_state, &s, s + 1, memory_order_acq_rel,
                                                      memory_order_acquire)) {
        }
        if (s & JOB_CLOSED) continue;
        const int nth = g_nth;
        if (idx + 1 < nth) g_fn(g_arg, idx + 1, nth);
        atomic_fetch_sub_explicit(&g_state, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers do not exist in a forked child: start over */
    g_nworkers = 0;
    atomic_store(&g_state, JOB_CLOSED);
    pthread_mutex_init(&g_call, NULL);
    pthread_mutex_init(&g_m, NULL);
    pthread_cond_init(&g_cv, NULL);
}
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void init_once(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* runs fn(arg, i, nth) on up to nth threads (the caller always; workers if they come in time).
 * fn must claim its work dynamically and tolerate being entered by fewer threads. */
static void parallel(qg_task_fn fn, void *arg, int nth) {
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_once(&g_once, init_once);
    pthread_mutex_lock(&g_call);
    while (g_nworkers < nth - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) break;
        wa->idx = g_nworkers;
        wa->gen = atomic_load(&g_gen);
        int rc = pthread_create(&th, &at, worker_main, wa);
        pthread_attr_destroy(&at);
        if (rc != 0) { free(wa); break; }
        g_nworkers++;
    }
    if (nth - 1 > g_nworkers) nth = g_nworkers + 1;
    g_fn = fn;
    g_arg = arg;
    g_nth = nth;
    atomic_store_explicit(&g_state, 0, memory_order_release); /* open */
    pthread_mutex_lock(&g_m);
    atomic_fetch_add_explicit(&g_gen, 1, memory_order_release);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_m);
    fn(arg, 0, nth);
    atomic_fetch_or_explicit(&g_state, JOB_CLOSED, memory_order_acq_rel);
    for (unsigned i = 1; atomic_load_explicit(&g_state, memory_order_acquire) != JOB_CLOSED; i++) {
        cpu_relax();
        if ((i & 1023) == 0) sched_yield();
    }
    pthread_mutex_unlock(&g_call);
}

static void spin_until(atomic_int_fast64_t *v, int64_t target) {
    for (unsigned i = 1; atomic_load_explicit(v, memory_order_acquire) < target; i++) {
        cpu_relax();
        if ((i & 1023) == 0) sched_yield();
    }
}

/* rows per dynamically claimed chunk: ~4 chunks per thread, multiple of align */
static int64_t chunk_rows(int64_t R, int nth, int64_t align, int64_t maxc) {
    int64_t c = R / (4 * (int64_t)nth);
    c = (c + align - 1) / align * align;
    if (c < align) c = align;
    if (c > maxc) c = maxc;
    return c;
}

static int clamp_threads(int nthreads, int64_t work_units) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > QG_MAX_THREADS) nthreads = QG_MAX_THREADS;
    if (work_units < 1) work_units = 1;
    if (nthreads > work_units) nthreads = (int)work_units;
    return nthreads;
}

static const qg_type_traits *check(const qg_tensor *t) {
    if (!t || !t->codes || !t->codebooks || !t->scales) return fail("null tensor pointer"), NULL;
    if (t->type == QG_TYPE_AQ) {
        if (t->B != 8 && t->B != 16) return fail("AQ: B must be 8 or 16"), NULL;
        if (t->g < 1 || t->M < 1 || t->R < 1 || t->C < 1 || t->C % t->g)
            return fail("AQ: bad shape"), NULL;
        if (t->g != 4 && t->g != 8 && t->g != 16) return fail("AQ: g must be 4, 8 or 16"), NULL;
        if (t->B == 8 && !t->cbT) return fail("AQ: B=8 needs the transposed codebooks"), NULL;
    } else if (t->type == QG_TYPE_VQ) {
        const qg_vq_side *sd = (const qg_vq_side *)t->aux1;
        const int64_t v = t->M, k = t->iparam[0], kr = t->iparam[2], n_out = t->iparam[3];
        if (v != 2 && v != 4 && v != 8 && v != 16) return fail("VQ: v must be 2, 4, 8 or 16"), NULL;
        if (t->R < v || t->R % v || t->C < 1 || t->g < 1 || t->C % t->g) return fail("VQ: bad shape"), NULL;
        if (t->B < 2 || t->B > 16 || k != ((int64_t)1 << t->B)) return fail("VQ: bad index width"), NULL;
        if (t->iparam[1] < 0 || t->iparam[1] > 16 || kr != (t->iparam[1] ? (int64_t)1 << t->iparam[1] : 0))
            return fail("VQ: bad residual index width"), NULL;
        if (n_out < 0 || n_out >= t->C || t->iparam[4] < 1 || t->iparam[5] < 1 ||
            t->iparam[4] * t->iparam[5] < t->C - n_out)
            return fail("VQ: bad outlier/group layout"), NULL;
        if (!sd || !sd->perm || !sd->colbias || (n_out && !sd->obook) ||
            (t->iparam[1] && (!sd->rbooks || !t->aux0)))
            return fail("VQ: null side pointer"), NULL;
    }
    const qg_type_traits *tr = traits_for(t->type, qg_get_isa());
    if (!tr || !tr->vec_rows) tr = traits_for(t->type, QG_ISA_SCALAR);
    if (!tr || !tr->vec_rows) return fail("no kernel for this tensor type"), NULL;
    return tr;
}

/* ---------------------------------------------------------------- dequantize */
typedef struct {
    const qg_tensor *t;
    const qg_type_traits *tr;
    int64_t r0, r1, chunk;
    float *out;
    atomic_int_fast64_t next;
} dq_ctx;
static void dq_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    dq_ctx *c = p;
    for (;;) {
        const int64_t a = atomic_fetch_add(&c->next, c->chunk);
        if (a >= c->r1 - c->r0) break;
        const int64_t b = a + c->chunk < c->r1 - c->r0 ? a + c->chunk : c->r1 - c->r0;
        c->tr->dequantize_rows(c->t, c->r0 + a, c->r0 + b, c->out + a * c->t->C);
    }
}
int qg_dequantize_rows(const qg_tensor *t, int64_t r0, int64_t r1, float *out, int nthreads) {
    const qg_type_traits *tr = check(t);
    if (!tr) return -1;
    if (r0 < 0 || r1 > t->R || r0 > r1 || !out) return fail("bad row range");
    dq_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t; c.tr = tr; c.r0 = r0; c.r1 = r1; c.out = out;
    const int nth = clamp_threads(nthreads, (r1 - r0 + 15) / 16);
    c.chunk = chunk_rows(r1 - r0, nth, 16, 256);
    atomic_store(&c.next, 0);
    parallel(dq_task, &c, nth);
    return 0;
}

/* ---------------------------------------------------------------- scratch for prepared inputs
 * The lookup tables of one call (256 KiB for a 2x8-g8 tensor of C = 2048, 1 MiB for C = 8192) live in a
 * buffer kept per calling thread, so that decoding does not allocate (and fault in fresh pages of) a table per
 * weight per token.  Buffers up to QG_SCRATCH_KEEP bytes are kept (freed when the thread exits); larger ones
 * (many-token matmuls) are allocated per call. */
#define QG_SCRATCH_KEEP ((size_t)16 << 20)
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
typedef struct { float *p; size_t cap; int busy; } scratch_buf;
static void scratch_free(void *v) {
    scratch_buf *s = v;
    if (s) { free(s->p); free(s); }
}
static void scratch_init(void) {
    if (pthread_key_create(&g_scratch_key, scratch_free) != 0) g_scratch_key = (pthread_key_t)-1;
}
/* 64-byte aligned room for nfloat floats; release with scratch_release */
static float *scratch(int64_t nfloat) {
    const size_t bytes = ((size_t)nfloat * sizeof(float) + 63) / 64 * 64;
    pthread_once(&g_scratch_once, scratch_init);
    scratch_buf *s = g_scratch_key == (pthread_key_t)-1 ? NULL : pthread_getspecific(g_scratch_key);
    if (bytes > QG_SCRATCH_KEEP || g_scratch_key == (pthread_key_t)-1 || (s && s->busy))
        return aligned_alloc(64, bytes);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return aligned_alloc(64, bytes);
        if (pthread_setspecific(g_scratch_key, s) != 0) { free(s); return aligned_alloc(64, bytes); }
    }
    if (s->cap < bytes) {
        float *p = aligned_alloc(64, bytes);
        if (!p) return NULL;
        free(s->p);
        s->p = p;
        s->cap = bytes;
    }
    s->busy = 1;
    return s->p;
}
static void scratch_release(float *p) {
    if (!p) return;
    scratch_buf *s = g_scratch_key == (pthread_key_t)-1 ? NULL : pthread_getspecific(g_scratch_key);
    if (s && s->p == p && s->busy) s->busy = 0;
    else free(p);
}

/* ---------------------------------------------------------------- matvec / small-N matmul */
typedef struct {
    const qg_tensor *t;
    const qg_type_traits *tr;
    const float *X; /* N x C */
    float *Y;       /* N x R */
    int64_t N;
    float *prep;    /* N x prep_size, or NULL */
    int64_t psz, nblk, chunk;
    atomic_int_fast64_t prep_next, prep_done, row_next;
} mv_ctx;
static void mv_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    mv_ctx *c = p;
    const qg_tensor *t = c->t;
    if (c->prep) {
        const int64_t J = t->C / t->g, total = c->nblk * c->N;
        for (;;) {
            const int64_t b = atomic_fetch_add(&c->prep_next, 1);
            if (b >= total) break;
            const int64_t n = b / c->nblk, j0 = (b % c->nblk) * QG_JTILE;
            const int64_t j1 = j0 + QG_JTILE < J ? j0 + QG_JTILE : J;
            c->tr->prepare(t, c->X + n * t->C, c->prep + n * c->psz, j0, j1);
            atomic_fetch_add_explicit(&c->prep_done, 1, memory_order_release);
        }
        spin_until(&c->prep_done, total);
    }
    /* work items are (token, row chunk), token-major: one token's table stays in L2 while the
       rows stream */
    const int64_t nch = (t->R + c->chunk - 1) / c->chunk;
    for (;;) {
        const int64_t i = atomic_fetch_add(&c->row_next, 1);
        if (i >= nch * c->N) break;
        const int64_t n = i / nch, a = (i % nch) * c->chunk;
        const int64_t b = a + c->chunk < t->R ? a + c->chunk : t->R;
        c->tr->vec_rows(t, c->X + n * t->C, c->prep ? c->prep + n * c->psz : NULL,
                        c->Y + n * t->R, a, b);
    }
}
/* QGGUF_NATIVE_TABLE_BITS: 8 or 16 forces that table precision for every N; unset (or any other value): 8 for
 * one token where a path has a one-token variant, else 16 */
static int g_table_bits = -1;
int qg_table_bits(void) {
    if (g_table_bits == -1) {
        const char *s = getenv("QGGUF_NATIVE_TABLE_BITS");
        const int v = s ? atoi(s) : 0;
        g_table_bits = v == 8 || v == 16 ? v : 0;
    }
    return g_table_bits;
}
/* the kernels a product of N tokens runs: the one-token variant (qg_type_traits.vec_rows1) where there is one */
static qg_type_traits traits_n(const qg_type_traits *tr, int64_t N) {
    qg_type_traits r = *tr;
    const int bits = qg_table_bits();
    if (tr->vec_rows1 && (bits == 8 || (bits == 0 && N == 1))) {
        r.prep_size = tr->prep_size1;
        r.prepare = tr->prepare1;
        r.vec_rows = tr->vec_rows1;
        r.table_bits = tr->table_bits1;
    }
    return r;
}
int qg_aq_table_bits(int B, int64_t N) {
    const qg_type_traits *tr = traits_for(QG_TYPE_AQ, qg_get_isa());
    if (B != 8 || !tr) return 0;     /* B=16: dequantize-and-dot, no tables */
    return traits_n(tr, N < 1 ? 1 : N).table_bits;
}

static int matvec_n(const qg_tensor *t, const qg_type_traits *tr0, const float *X, int64_t N,
                    float *Y, int nthreads) {
    const qg_type_traits trn = traits_n(tr0, N), *tr = &trn;
    mv_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t; c.tr = tr; c.X = X; c.Y = Y; c.N = N;
    c.psz = tr->prep_size ? tr->prep_size(t) : 0;
    c.nblk = (t->C / t->g + QG_JTILE - 1) / QG_JTILE;
    if (c.psz > 0) {
        c.prep = scratch(c.psz * N);
        if (!c.prep) return fail("out of memory (lookup table)");
    }
    const int nth = clamp_threads(nthreads, (t->R + QG_ROW_ALIGN - 1) / QG_ROW_ALIGN);
    c.chunk = chunk_rows(t->R, nth, QG_ROW_ALIGN, 1024);
    atomic_store(&c.prep_next, 0);
    atomic_store(&c.prep_done, 0);
    atomic_store(&c.row_next, 0);
    parallel(mv_task, &c, nth);
    scratch_release(c.prep);
    return 0;
}
int qg_matvec(const qg_tensor *t, const float *x, float *y, int nthreads) {
    const qg_type_traits *tr = check(t);
    if (!tr) return -1;
    if (!x || !y) return fail("null vector");
    return matvec_n(t, tr, x, 1, y, nthreads);
}

/* ---------------------------------------------------------------- several tensors, one input
 * y_i = W_i x for up to QG_MULTI_MAX tensors of the same C (q/k/v, gate/up of a decoder layer) in one
 * parallel job: the threads prepare every tensor's input tables (tiles of all tensors from one counter), wait
 * once, then run the row chunks of all tensors from one counter.  Each row gets exactly the arithmetic of
 * qg_matvec (the same kernels on the same 64-aligned row ranges), so the results are bit-identical; what is
 * saved is a dispatch and a barrier per extra tensor, and the small tensors' tails balance against the others. */
typedef struct {
    int n;
    const float *x;
    const qg_tensor *t[QG_MULTI_MAX];
    qg_type_traits tr[QG_MULTI_MAX]; /* the one-token kernels of each tensor (traits_n) */
    float *y[QG_MULTI_MAX];
    float *prep[QG_MULTI_MAX];     /* NULL: the row kernel reads x */
    int64_t tile_end[QG_MULTI_MAX]; /* cumulative prepare tiles */
    int64_t ch_end[QG_MULTI_MAX];   /* cumulative row chunks */
    int64_t chunk[QG_MULTI_MAX];
    atomic_int_fast64_t prep_next, prep_done, row_next;
} mvm_ctx;
static void mvm_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    mvm_ctx *c = p;
    const int64_t ntiles = c->tile_end[c->n - 1];
    if (ntiles > 0) {
        int i = 0;
        for (;;) {
            const int64_t b = atomic_fetch_add(&c->prep_next, 1);
            if (b >= ntiles) break;
            while (b >= c->tile_end[i]) i++;   /* b only grows for this thread */
            const qg_tensor *t = c->t[i];
            const int64_t J = t->C / t->g, j0 = (b - (i ? c->tile_end[i - 1] : 0)) * QG_JTILE;
            const int64_t j1 = j0 + QG_JTILE < J ? j0 + QG_JTILE : J;
            c->tr[i].prepare(t, c->x, c->prep[i], j0, j1);
            atomic_fetch_add_explicit(&c->prep_done, 1, memory_order_release);
        }
        spin_until(&c->prep_done, ntiles);
    }
    const int64_t nch = c->ch_end[c->n - 1];
    int i = 0;
    for (;;) {
        const int64_t k = atomic_fetch_add(&c->row_next, 1);
        if (k >= nch) break;
        while (k >= c->ch_end[i]) i++;
        const qg_tensor *t = c->t[i];
        const int64_t a = (k - (i ? c->ch_end[i - 1] : 0)) * c->chunk[i];
        const int64_t e = a + c->chunk[i] < t->R ? a + c->chunk[i] : t->R;
        c->tr[i].vec_rows(t, c->x, c->prep[i], c->y[i], a, e);
    }
}
int qg_matvec_multi(const qg_tensor **ts, int n, const float *x, float **ys, int nthreads) {
    if (!ts || !ys || n < 1 || n > QG_MULTI_MAX) return fail("matvec_multi: 1 to 16 tensors");
    if (!x) return fail("null vector");
    mvm_ctx c;
    memset(&c, 0, sizeof c);
    c.n = n; c.x = x;
    int64_t tiles = 0, rows = 0, psz[QG_MULTI_MAX], ptotal = 0;
    for (int i = 0; i < n; i++) {
        const qg_type_traits *tr = check(ts[i]);
        if (!tr) return -1;
        if (!ys[i]) return fail("null vector");
        if (ts[i]->C != ts[0]->C) return fail("matvec_multi: the tensors differ in C");
        c.tr[i] = traits_n(tr, 1);
        c.t[i] = ts[i]; c.y[i] = ys[i];
        psz[i] = c.tr[i].prep_size ? c.tr[i].prep_size(ts[i]) : 0;
        ptotal += (psz[i] + 15) / 16 * 16;    /* each table 64-byte aligned */
        if (psz[i] > 0) tiles += (ts[i]->C / ts[i]->g + QG_JTILE - 1) / QG_JTILE;
        c.tile_end[i] = tiles;
        rows += ts[i]->R;
    }
    const int nth = clamp_threads(nthreads, (rows + QG_ROW_ALIGN - 1) / QG_ROW_ALIGN);
    int64_t chunks = 0;
    for (int i = 0; i < n; i++) {
        c.chunk[i] = chunk_rows(ts[i]->R, nth, QG_ROW_ALIGN, 1024);
        chunks += (ts[i]->R + c.chunk[i] - 1) / c.chunk[i];
        c.ch_end[i] = chunks;
    }
    float *buf = NULL;
    if (ptotal > 0) {
        buf = scratch(ptotal);
        if (!buf) return fail("out of memory (lookup table)");
        float *q = buf;
        for (int i = 0; i < n; i++)
            if (psz[i] > 0) { c.prep[i] = q; q += (psz[i] + 15) / 16 * 16; }
    }
    atomic_store(&c.prep_next, 0);
    atomic_store(&c.prep_done, 0);
    atomic_store(&c.row_next, 0);
    parallel(mvm_task, &c, nth);
    scratch_release(buf);
    return 0;
}

/* ---------------------------------------------------------------- large-N matmul: tiles */
static int g_lut_max = -1;

/* Largest N for which matmul runs the matvec kernel per token.  Default: no limit on the
 * AVX-512 Kx8 path (its per-token cost, ~0.2 ms for 2048x8192, stays below a float GEMM's even at
 * N=128), 4 elsewhere (the gather/scalar LUT kernels lose to dequantized tiles + blocked dot).
 * QGGUF_NATIVE_LUT_MAX overrides it.  Returns the override, or -1 (automatic). */
int qg_matmul_lut_max(void) {
    if (g_lut_max == -1) {
        const char *s = getenv("QGGUF_NATIVE_LUT_MAX");
        g_lut_max = s ? atoi(s) : -2;
    }
    return g_lut_max < 0 ? -1 : g_lut_max;
}
static int64_t lut_max_for(const qg_tensor *t) {
    const int v = qg_matmul_lut_max();
    if (v >= 0) return v;
    return (t->type == QG_TYPE_AQ && qg_get_isa() == QG_ISA_AVX512 && t->B == 8) ? INT64_MAX : 4;
}

typedef struct {
    const qg_tensor *t;
    const qg_type_traits *tr;
    const float *X;
    float *Y;
    int64_t N, tile;
    atomic_int_fast64_t next;
} mm_ctx;
static void mm_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    mm_ctx *c = p;
    const qg_tensor *t = c->t;
    float *w = aligned_alloc(64, (size_t)(c->tile * t->C) * sizeof(float));
    if (!w) return;
    for (;;) {
        int64_t r0 = atomic_fetch_add(&c->next, c->tile);
        if (r0 >= t->R) break;
        int64_t r1 = r0 + c->tile < t->R ? r0 + c->tile : t->R;
        c->tr->dequantize_rows(t, r0, r1, w);
        c->tr->gemm_tile(c->X, c->N, t->C, w, r1 - r0, c->Y + r0, t->R);
    }
    free(w);
}
int qg_matmul(const qg_tensor *t, const float *X, int64_t N, float *Y, int nthreads) {
    const qg_type_traits *tr = check(t);
    if (!tr) return -1;
    if (!X || !Y || N < 0) return fail("bad matmul arguments");
    if (N == 0) return 0;
    if (N <= lut_max_for(t) || !tr->gemm_tile) return matvec_n(t, tr, X, N, Y, nthreads);
    mm_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t; c.tr = tr; c.X = X; c.Y = Y; c.N = N;
    /* a tile of dequantized rows of ~256 KiB (fits L2 next to a few rows of X) */
    int64_t tile = (65536 / t->C) / 4 * 4;
    c.tile = tile < 4 ? 4 : tile > 64 ? 64 : tile;
    atomic_store(&c.next, 0);
    parallel(mm_task, &c, clamp_threads(nthreads, (t->R + c.tile - 1) / c.tile));
    /* a thread that could not get its tile leaves the rows to the others */
    if (atomic_load(&c.next) < t->R) return fail("out of memory (matmul tile)");
    return 0;
}

/* ---------------------------------------------------------------- dense float32 matrix-vector product
 * y = W x for a row-major float32 W (R x C) over the thread pool, 64-row chunks through the current ISA's gemm_tile
 * (the micro-kernel of the dequantized tiles, N = 1): the decoder's dense output matrix, which torch.mv runs on
 * one thread.  Sums in another order than torch's (rounding-level differences). */
typedef struct {
    const qg_type_traits *tr;
    const float *W, *x;
    float *y;
    int64_t R, C, chunk;
    atomic_int_fast64_t next;
} dmv_ctx;
static void dmv_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    dmv_ctx *c = p;
    for (;;) {
        const int64_t a = atomic_fetch_add(&c->next, c->chunk);
        if (a >= c->R) break;
        const int64_t b = a + c->chunk < c->R ? a + c->chunk : c->R;
        c->tr->gemm_tile(c->x, 1, c->C, c->W + a * c->C, b - a, c->y + a, c->R);
    }
}
int qg_dense_matvec(const float *W, int64_t R, int64_t C, const float *x, float *y, int nthreads) {
    if (!W || !x || !y) return fail("null pointer");
    if (R < 1 || C < 1) return fail("dense matvec: bad shape");
    const qg_type_traits *tr = traits_for(QG_TYPE_AQ, qg_get_isa());
    if (!tr || !tr->gemm_tile) tr = traits_for(QG_TYPE_AQ, QG_ISA_SCALAR);
    dmv_ctx c;
    memset(&c, 0, sizeof c);
    c.tr = tr; c.W = W; c.x = x; c.y = y; c.R = R; c.C = C; c.chunk = QG_ROW_ALIGN;
    atomic_store(&c.next, 0);
    parallel(dmv_task, &c, clamp_threads(nthreads, (R + QG_ROW_ALIGN - 1) / QG_ROW_ALIGN));
    return 0;
}

/* ---------------------------------------------------------------- single-token attention (decoding)
 * The part of a decoder layer between the q/k/v and output projections, for one token at position pos:
 *   rope (ggml NORM mode: adjacent pairs, n_rot = dk) of q and k in place in qk = [q (H*dk) | k (Hkv*dk)],
 *   K[h][pos] = k_h, V[h][pos] = v_h (rounded to fp16 when round16: llama.cpp's F16 cache),
 *   a_h = softmax(scale * q_h . K[h/G][0..pos]) . V[h/G][0..pos]   (q and the probabilities rounded to fp16
 *   when round16), G = H / Hkv.
 * rope and the cache stores are bit-identical to the runner's torch code (products then one add, no FMA); the
 * dot products and the softmax are float32 in another summation order than torch's (rounding-level
 * differences).  Heads are spread over the thread pool. */
#if defined(__FLT16_MAX__)
static inline float round_half(float f) { return (float)(_Float16)f; }
#else
static inline float round_half(float f) {   /* float -> IEEE half (nearest even) -> float, in software */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    float r;
    if (a >= 0x7f800000u) return f;                                   /* inf, nan */
    if (a >= 0x477ff000u) { uint32_t inf = sign | 0x7f800000u; memcpy(&r, &inf, 4); return r; } /* overflow */
    if (a < 0x38800000u) {                                            /* half subnormal: multiples of 2^-24 */
        const float q = (float)(f * 16777216.0f);
        const float n = __builtin_rintf(q);                           /* ties to even */
        return n / 16777216.0f;
    }
    const uint32_t lsb = (a >> 13) & 1u, rounded = (a + 0x0fffu + lsb) & ~0x1fffu;
    const uint32_t v = sign | rounded;
    memcpy(&r, &v, 4);
    return r;
}
#endif

typedef struct {
    const float *q;
    const float *K, *V;
    float *a;
    int H, G, dk, dv, round16;
    int64_t n, cap;
    float scale;
    atomic_int_fast64_t next;
    atomic_int fail;
} attn_ctx;
static void attn_task(void *p, int ith, int nth) {
    (void)ith; (void)nth;
    attn_ctx *c = p;
    const int dk = c->dk, dv = c->dv;
    const int64_t n = c->n;
    float *s = malloc((size_t)(n + dk + dv) * sizeof(float));
    if (!s) { atomic_store(&c->fail, 1); return; }
    float *qh = s + n, *acc = qh + dk;
    for (;;) {
        const int64_t h = atomic_fetch_add(&c->next, 1);
        if (h >= c->H) break;
        const int64_t kvh = h / c->G;
        const float *K = c->K + kvh * c->cap * dk, *V = c->V + kvh * c->cap * dv;
        for (int d = 0; d < dk; d++) qh[d] = c->round16 ? round_half(c->q[h * dk + d]) : c->q[h * dk + d];
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            const float v = qg_dot_f32(qh, K + i * dk, dk) * c->scale;
            s[i] = v;
            if (v > mx) mx = v;
        }
        float sum = 0.f;
        for (int64_t i = 0; i < n; i++) { s[i] = expf(s[i] - mx); sum += s[i]; }
        const float inv = 1.f / sum;
        for (int d = 0; d < dv; d++) acc[d] = 0.f;
        for (int64_t i = 0; i < n; i++) {
            const float pi = c->round16 ? round_half(s[i] * inv) : s[i] * inv;
            const float *vr = V + i * dv;
            for (int d = 0; d < dv; d++) acc[d] += pi * vr[d];
        }
        memcpy(c->a + h * dv, acc, (size_t)dv * sizeof(float));
    }
    free(s);
}

int qg_decode_attn(float *qk, const float *v, const float *cosv, const float *sinv, float *Kc, float *Vc,
                   float *a, int H, int Hkv, int dk, int dv, int64_t pos, int64_t cap, float scale, int round16,
                   int nthreads) {
    if (!qk || !v || !cosv || !sinv || !Kc || !Vc || !a) return fail("decode_attn: null pointer");
    if (H < 1 || Hkv < 1 || H % Hkv || dk < 2 || dk % 2 || dv < 1 || dk > 4096 || dv > 4096)
        return fail("decode_attn: bad head layout");
    if (pos < 0 || pos >= cap) return fail("decode_attn: position outside the cache");
    /* rope: adjacent pairs of every q and k head; x0*c - x1*s and x0*s + x1*c as two products and one add */
    const int half = dk / 2;
    for (int h = 0; h < H + Hkv; h++) {
        float *x = qk + (int64_t)h * dk;
        for (int i = 0; i < half; i++) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1], c = cosv[i], s = sinv[i];
            const float p0 = x0 * c, p1 = x1 * s, p2 = x0 * s, p3 = x1 * c;
            x[2 * i] = p0 - p1;
            x[2 * i + 1] = p2 + p3;
        }
    }
    const float *k = qk + (int64_t)H * dk;
    for (int h = 0; h < Hkv; h++) {
        float *kd = Kc + ((int64_t)h * cap + pos) * dk, *vd = Vc + ((int64_t)h * cap + pos) * dv;
        for (int d = 0; d < dk; d++) kd[d] = round16 ? round_half(k[h * dk + d]) : k[h * dk + d];
        for (int d = 0; d < dv; d++) vd[d] = round16 ? round_half(v[h * dv + d]) : v[h * dv + d];
    }
    attn_ctx c;
    memset(&c, 0, sizeof c);
    c.q = qk; c.K = Kc; c.V = Vc; c.a = a;
    c.H = H; c.G = H / Hkv; c.dk = dk; c.dv = dv; c.round16 = round16;
    c.n = pos + 1; c.cap = cap; c.scale = scale;
    atomic_store(&c.next, 0);
    atomic_store(&c.fail, 0);
    /* a thread pays off only with enough positions to share (a job hand-off costs a few microseconds) */
    const int nth = c.n * (int64_t)H * (dk + dv) < 65536 ? 1 : clamp_threads(nthreads, H);
    parallel(attn_task, &c, nth);
    if (atomic_load(&c.fail)) {   /* a thread without scratch left heads to the others; redo any it claimed */
        atomic_store(&c.next, 0);
        atomic_store(&c.fail, 0);
        attn_task(&c, 0, 1);
        if (atomic_load(&c.fail)) return fail("out of memory (attention scratch)");
    }
    return 0;
}
