/* qgguf native kernels: shared declarations.
 *
 * Layout of the tensor types the kernels read (see qgguf.native for the Python side):
 *
 * AQ (additive multi-codebook quantization, AQLM-style). A weight W of R output rows and
 * C input columns; group size g divides C; M codebooks of 2^B entries of g values; scale s[r].
 *   W[r, j*g:(j+1)*g] = s[r] * sum_m codebook[m][codes[j][m][r]][0:g]
 *   codes      uint8 (B=8) or uint16 (B=16), [C/g][M][R]  (R fastest)
 *   codebooks  float32 [M][2^B][g]     (converted from float16 once, at tensor creation)
 *   cbT        float32 [M][g][2^B]     (B=8 only: transposed copy used to build lookup tables)
 *   scales     float32 [R]
 *
 * Dequantization is defined bit-exactly in float32 as
 *   acc = cb[0][c0][d]; acc += cb[1][c1][d]; ...; out = acc * s[r]
 * and every ISA path produces exactly those values (no FMA contraction in dequantization).
 */
#ifndef QG_NATIVE_H
#define QG_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- public tensor descriptor (also declared for cffi in _build.py; keep in sync) ---- */
typedef struct qg_tensor {
    int32_t type;       /* QG_TYPE_* */
    int32_t M;          /* number of codebooks */
    int32_t B;          /* bits per code: 8 or 16 */
    int32_t g;          /* group size (values per codebook entry): 4, 8 or 16 */
    int64_t R;          /* output rows */
    int64_t C;          /* input columns */
    const void *codes;  /* [C/g][M][R] uint8 or uint16 */
    const float *codebooks; /* [M][2^B][g] */
    const float *cbT;   /* [M][g][2^B] (B=8), else NULL */
    const float *scales;/* [R] */
    const void *codes_tiled; /* optional (B=8, read by the AVX-512 path): the codes re-laid out
                                block-major for sequential streaming, [Rp/64][J*M][64] where
                                Rp = R rounded up to 64 (padding codes are 0): 64-row block b
                                holds its codes of (j, m) at byte (b*J*M + j*M + m)*64, one byte
                                per row.  NULL: the kernels read codes. */
    const void *aux0;   /* reserved for VQ (outliers, residual codebooks, ...) */
    const void *aux1;
    int64_t iparam[8];  /* reserved for VQ (index bit width, ...) */
} qg_tensor;

enum { QG_TYPE_AQ = 0, QG_TYPE_VQ = 1, QG_TYPE_COUNT = 2 };
enum { QG_ISA_SCALAR = 0, QG_ISA_AVX2 = 1, QG_ISA_AVX512 = 2, QG_ISA_NEON = 3, QG_ISA_COUNT = 4 };

/* ---- type traits: one entry per (type, ISA) ----
 * Kernels work on a row range [r0, r1) on the calling thread; the core (qg_core.c) splits the
 * work over threads.  prepare() turns an input vector into whatever the row kernel reads
 * (for AQ Kx8: the lookup table LUT[j][m][256] for groups [j0, j1)). */
typedef struct qg_type_traits {
    const char *name;
    /* out: (r1-r0) x C float32, row-major */
    void (*dequantize_rows)(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
    /* floats of scratch a prepared input needs (0: the row kernel reads x itself) */
    int64_t (*prep_size)(const qg_tensor *t);
    /* fills prep for input groups [j0, j1) */
    void (*prepare)(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1);
    /* y[r] for r in [r0, r1); prep from prepare() (or NULL if prep_size is 0) */
    void (*vec_rows)(const qg_tensor *t, const float *x, const float *prep, float *y,
                     int64_t r0, int64_t r1);
    /* blocked float dot: Y[n][r] = sum_c X[n][c] * Wt[r-r0][c] for n < N, r in [r0, r1);
       Wt is a dequantized tile; ldy = row stride of Y. Shared by all types. */
    void (*gemm_tile)(const float *X, int64_t N, int64_t C, const float *Wt, int64_t nr,
                      float *Y, int64_t ldy);
    /* optional: the one-token variant of prep_size/prepare/vec_rows (qg_matvec, qg_matvec_multi, qg_matmul with
       N = 1: decoding), where an ISA trades precision for speed as llama.cpp does when it rounds activations to
       8 bits (the AVX-512 Kx8 path: 8-bit instead of 16-bit tables).  NULL: the above serve every N.
       QGGUF_NATIVE_TABLE_BITS=16 (or 8) makes every N use the above (or this) variant. */
    int64_t (*prep_size1)(const qg_tensor *t);
    void (*prepare1)(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1);
    void (*vec_rows1)(const qg_tensor *t, const float *x, const float *prep, float *y,
                      int64_t r0, int64_t r1);
    /* bits of a lookup-table entry that vec_rows (table_bits) and vec_rows1 (table_bits1) read for AQ B=8
       (32: float tables; 0: no tables); qg_aq_table_bits() reports the one a product runs */
    int table_bits;
    int table_bits1;
} qg_type_traits;

/* per-ISA tables, NULL entries where a type has no kernel on that ISA */
extern const qg_type_traits qg_traits_scalar[QG_TYPE_COUNT];
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define QG_X86 1
extern const qg_type_traits qg_traits_avx2[QG_TYPE_COUNT];
extern const qg_type_traits qg_traits_avx512[QG_TYPE_COUNT];
#endif
#if defined(__aarch64__)
#define QG_ARM64 1
extern const qg_type_traits qg_traits_neon[QG_TYPE_COUNT];
#endif

/* scalar helpers reused by the SIMD files for tails and rarely used configurations */
void qg_aq_dequantize_rows_scalar(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
int64_t qg_aq_prep_size(const qg_tensor *t);
void qg_aq_prepare_scalar(const qg_tensor *t, const float *x, float *lut, int64_t j0, int64_t j1);
void qg_aq_vec_rows_scalar(const qg_tensor *t, const float *x, const float *lut, float *y,
                           int64_t r0, int64_t r1);
void qg_gemm_tile_scalar(const float *X, int64_t N, int64_t C, const float *Wt, int64_t nr,
                         float *Y, int64_t ldy);

/* ---- VQ (VPTQ-style vector quantization; qgguf.gguf_types.vq, docs/FORMAT.md "VQ tensors") ----
 * Fields of qg_tensor for type QG_TYPE_VQ:
 *   M = v (vector length: 2, 4, 8 or 16), B = bits of a main index, g = columns per prepare unit
 *   (divides C), R (a multiple of v), C;
 *   codes     the packed main-index stream: element e = b*C + p (vector row b, column position p)
 *             at bits [e*B, (e+1)*B), little-endian bit order, + 3 readable padding bytes
 *   codebooks float32 [G][k][v]            scales  float32 column scales [C] (position order)
 *   aux0      the packed residual-index stream (e = b*(C-n_out) + p-n_out, iparam[1] bits) or NULL
 *   aux1      a qg_vq_side (rbooks, obook, perm, colbias)
 *   iparam    [0] k  [1] residual bits (0: none)  [2] kr  [3] n_out  [4] G  [5] columns per group
 *   W[b*v+i, perm[p]] = (book(p)[idx][i] + rbook(p)[ridx][i]) * scale[p] + bias[p]   (float32,
 *   no FMA); the matvec prepares xs[p] = x[perm[p]] * scale[p] and the bias term sum x[perm[p]]*bias[p]
 *   (the AVX-512 4-bit kernel, qg_vq_avx512.c, stores xs in its own lane order and needs qg_vq_prep_size_avx512). */
typedef struct qg_vq_side {
    const float *rbooks;   /* [G][kr][v] or NULL */
    const float *obook;    /* [k][v] or NULL (n_out = 0) */
    const int32_t *perm;   /* [C] */
    const float *colbias;  /* [C] */
} qg_vq_side;

static inline uint32_t qg_vq_get(const uint8_t *s, int64_t e, int bits) {
    const uint64_t pos = (uint64_t)e * (uint64_t)bits;
    uint32_t w;
    memcpy(&w, s + (pos >> 3), 4);
    return (w >> (pos & 7)) & ((1u << bits) - 1u);
}
/* bytes a kernel may read of a packed stream of n indices of `bits` bits: the data plus the 3 padding bytes */
static inline uint64_t qg_vq_stream_bytes(uint64_t n, int bits) {
    return (n * (uint64_t)bits + 7) / 8 + 3;
}
void qg_vq_dequantize_rows_scalar(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
int64_t qg_vq_prep_size(const qg_tensor *t);
void qg_vq_prepare_scalar(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1);
void qg_vq_vec_rows_scalar(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1);
float qg_vq_bias_term(const qg_tensor *t, const float *prep);
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
void qg_vq_dequantize_rows_avx2(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
void qg_vq_prepare_avx2(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1);
void qg_vq_vec_rows_avx2(const qg_tensor *t, const float *x, const float *prep, float *y,
                         int64_t r0, int64_t r1);
void qg_vq_dequantize_rows_avx512(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
int64_t qg_vq_prep_size_avx512(const qg_tensor *t);
void qg_vq_prepare_avx512(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1);
void qg_vq_vec_rows_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1);
#endif
#if defined(__aarch64__)
void qg_vq_dequantize_rows_neon(const qg_tensor *t, int64_t r0, int64_t r1, float *out);
void qg_vq_vec_rows_neon(const qg_tensor *t, const float *x, const float *prep, float *y,
                         int64_t r0, int64_t r1);
#endif

/* sum a[i]*b[i] in float32 with four partial sums, ((s0 + s1) + (s2 + s3)), the tail into s0: the one
 * summation order of the scalar dot products (qg_gemm_tile_scalar, the decode attention's q.k) */
static inline float qg_dot_f32(const float *a, const float *b, int64_t n) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* row-block size the kernels like their ranges aligned to */
#define QG_ROW_ALIGN 64
/* input groups per LUT tile in the Kx8 row kernels (one block scale per tile of tables) */
#define QG_JTILE 16

/* ---- public API (declared for cffi in _build.py) ---- */
int qg_isa_available(int isa);
int qg_best_isa(void);
int qg_get_isa(void);
int qg_set_isa(int isa);         /* returns 0 or -1 if unavailable */
const char *qg_isa_name(int isa);
int qg_has_kernel(int type, int isa);
int qg_dequantize_rows(const qg_tensor *t, int64_t r0, int64_t r1, float *out, int nthreads);
int qg_matvec(const qg_tensor *t, const float *x, float *y, int nthreads);
int qg_matmul(const qg_tensor *t, const float *X, int64_t N, float *Y, int nthreads);
/* ys[i] = W_i x for n (1..QG_MULTI_MAX) tensors of the same C, one parallel job; bit-identical to n qg_matvec */
#define QG_MULTI_MAX 16
int qg_matvec_multi(const qg_tensor **ts, int n, const float *x, float **ys, int nthreads);
/* y = W x for a dense row-major float32 W (R x C) over the thread pool (the decoder's dense output matrix) */
int qg_dense_matvec(const float *W, int64_t R, int64_t C, const float *x, float *y, int nthreads);
/* one decoding token's rope (q, k in place in qk), K/V cache store at pos and attention into a (see qg_core.c) */
int qg_decode_attn(float *qk, const float *v, const float *cosv, const float *sinv, float *Kc, float *Vc,
                   float *a, int H, int Hkv, int dk, int dv, int64_t pos, int64_t cap, float scale, int round16,
                   int nthreads);
int qg_matmul_lut_max(void);
int qg_table_bits(void);       /* QGGUF_NATIVE_TABLE_BITS: 8 or 16 if set (every N), else 0 (automatic) */
int qg_aq_table_bits(int B, int64_t N); /* bits of the table entries a product of N tokens with an AQ tensor of
                                           B-bit codes reads on the current path (32: float; 0: no tables) */
const char *qg_last_error(void);

#endif
