/* AVX2 + FMA + F16C kernels. */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx2,fma,f16c"
#include "qg_target_begin.h"
#include <immintrin.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

/* ---- dequantize: exact (adds in codebook order, then one multiply) ---- */
static void dequantize_rows_avx2(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t R = t->R, C = t->C, g = t->g, M = t->M, J = C / g;
    const int64_t K = (int64_t)1 << t->B;
    const uint8_t *c8 = (const uint8_t *)t->codes;
    const uint16_t *c16 = (const uint16_t *)t->codes;
    const int b8 = t->B == 8;
    for (int64_t rb = r0; rb < r1; rb += 64) {
        const int64_t re = rb + 64 < r1 ? rb + 64 : r1;
        for (int64_t r = rb; r < re; r++) {
            for (int64_t j = 0; j < J; j++) {
                float *o = out + (r - r0) * C + j * g;
                const int64_t ci = j * M * R + r;
                if (g == 4) { /* one 128-bit lane per group */
                    __m128 acc = _mm_loadu_ps(t->codebooks + (b8 ? c8[ci] : c16[ci]) * 4);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = _mm_add_ps(acc, _mm_loadu_ps(t->codebooks + (m * K + k) * 4));
                    }
                    _mm_storeu_ps(o, _mm_mul_ps(acc, _mm_set1_ps(t->scales[r])));
                    continue;
                }
                const __m256 s = _mm256_set1_ps(t->scales[r]);
                for (int64_t h = 0; h < g; h += 8) {
                    __m256 acc = _mm256_loadu_ps(t->codebooks + (b8 ? c8[ci] : c16[ci]) * g + h);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = _mm256_add_ps(acc, _mm256_loadu_ps(t->codebooks + (m * K + k) * g + h));
                    }
                    _mm256_storeu_ps(o + h, _mm256_mul_ps(acc, s));
                }
            }
        }
    }
}

/* ---- Kx8 lookup tables from cbT[m][d][k] ---- */
static void prepare_avx2(const qg_tensor *t, const float *x, float *lut, int64_t j0, int64_t j1) {
    const int64_t g = t->g, M = t->M;
    if (g > 16) { qg_aq_prepare_scalar(t, x, lut, j0, j1); return; }
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * g;
        for (int64_t m = 0; m < M; m++) {
            const float *cb = t->cbT + m * g * 256;
            float *l = lut + (j * M + m) * 256;
            for (int kb = 0; kb < 256; kb += 32) {
                const __m256 x0 = _mm256_set1_ps(xj[0]);
                __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(cb + kb), x0);
                __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(cb + kb + 8), x0);
                __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(cb + kb + 16), x0);
                __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(cb + kb + 24), x0);
                for (int64_t d = 1; d < g; d++) {
                    const float *p = cb + d * 256 + kb;
                    const __m256 xd = _mm256_set1_ps(xj[d]);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p), xd, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p + 8), xd, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p + 16), xd, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p + 24), xd, a3);
                }
                _mm256_storeu_ps(l + kb, a0);
                _mm256_storeu_ps(l + kb + 8, a1);
                _mm256_storeu_ps(l + kb + 16, a2);
                _mm256_storeu_ps(l + kb + 24, a3);
            }
        }
    }
}

/* ---- Kx8 rows: float LUT + 8-lane gathers, input groups tiled (see the AVX-512 file) ---- */
AI void k8_block(const uint8_t *codes, const float *lut, float *y, int64_t R, int64_t rb,
                 int64_t jm0, int64_t jm1, int first, const int NV) {
    __m256 acc[4];
    for (int v = 0; v < NV; v++)
        acc[v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + rb + 8 * v);
    const uint8_t *c = codes + jm0 * R + rb;
    const float *l = lut + jm0 * 256;
    for (int64_t jm = jm0; jm < jm1; jm++, c += R, l += 256) {
        for (int v = 0; v < NV; v++) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8 * v)));
            acc[v] = _mm256_add_ps(acc[v], _mm256_i32gather_ps(l, idx, 4));
        }
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + rb + 8 * v, acc[v]);
}

static void vec_rows_k8_avx2(const qg_tensor *t, const float *lut, float *y, int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, J = t->C / t->g;
    const uint8_t *codes = (const uint8_t *)t->codes;
    const int64_t n = r1 - r0;
    const int64_t e32 = r0 + n / 32 * 32, e8 = r0 + n / 8 * 8;
    for (int64_t jt = 0; jt < J; jt += QG_JTILE) {
        const int64_t je = jt + QG_JTILE < J ? jt + QG_JTILE : J;
        int64_t rb = r0;
        for (; rb < e32; rb += 32) k8_block(codes, lut, y, R, rb, jt * M, je * M, jt == 0, 4);
        for (; rb < e8; rb += 8) k8_block(codes, lut, y, R, rb, jt * M, je * M, jt == 0, 1);
    }
    for (int64_t rb = r0; rb < e8; rb += 8)
        _mm256_storeu_ps(y + rb, _mm256_mul_ps(_mm256_loadu_ps(y + rb), _mm256_loadu_ps(t->scales + rb)));
    if (e8 < r1) qg_aq_vec_rows_scalar(t, NULL, lut, y, e8, r1);
}

AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- Mx16: dequantize-and-dot, 8 rows at a time ---- */
static void vec_rows_k16_avx2(const qg_tensor *t, const float *x, float *y, int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, g = t->g, J = t->C / g;
    const int64_t K = (int64_t)1 << t->B;
    if (g % 8) { qg_aq_vec_rows_scalar(t, x, NULL, y, r0, r1); return; } /* Mx16 with g = 4 */
    const uint16_t *codes = (const uint16_t *)t->codes;
    const int64_t e8 = r0 + (r1 - r0) / 8 * 8;
    for (int64_t rb = r0; rb < e8; rb += 8) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < J; j++) {
            for (int64_t h = 0; h < g; h += 8) {
                const __m256 xj = _mm256_loadu_ps(x + j * g + h);
                for (int64_t m = 0; m < M; m++) {
                    const uint16_t *c = codes + (j * M + m) * R + rb;
                    const float *cb = t->codebooks + m * K * g + h;
                    for (int i = 0; i < 8; i++)
                        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(cb + (int64_t)c[i] * g), xj, acc[i]);
                }
            }
        }
        for (int i = 0; i < 8; i++) y[rb + i] = hsum256(acc[i]) * t->scales[rb + i];
    }
    if (e8 < r1) qg_aq_vec_rows_scalar(t, x, NULL, y, e8, r1);
}

static void vec_rows_avx2(const qg_tensor *t, const float *x, const float *lut, float *y,
                          int64_t r0, int64_t r1) {
    if (t->B == 8) vec_rows_k8_avx2(t, lut, y, r0, r1);
    else vec_rows_k16_avx2(t, x, y, r0, r1);
}

/* ---- blocked float dot: 4 tokens x 2 rows per micro-kernel (C is a multiple of 8) ---- */
AI void mk_4x2(const float *X, int64_t C, const float *W, float *Y, int64_t ldy, int nn, int nr) {
    __m256 a[4][2];
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const __m256 w0 = _mm256_loadu_ps(W + c), w1 = _mm256_loadu_ps(W + (nr > 1 ? C : 0) + c);
        for (int i = 0; i < 4; i++) {
            const __m256 xv = _mm256_loadu_ps(X + (i < nn ? i : 0) * C + c);
            a[i][0] = _mm256_fmadd_ps(xv, w0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(xv, w1, a[i][1]);
        }
    }
    for (int i = 0; i < nn; i++)
        for (int k = 0; k < nr; k++) {
            float s = hsum256(a[i][k]);
            for (int64_t cc = c; cc < C; cc++) s += X[i * C + cc] * W[k * C + cc];
            Y[i * ldy + k] = s;
        }
}

static void gemm_tile_avx2(const float *X, int64_t N, int64_t C, const float *Wt, int64_t nr,
                           float *Y, int64_t ldy) {
    for (int64_t n = 0; n < N; n += 4) {
        const int nn = N - n < 4 ? (int)(N - n) : 4;
        for (int64_t r = 0; r < nr; r += 2) {
            const int rr = nr - r < 2 ? (int)(nr - r) : 2;
            if (nn == 4 && rr == 2) mk_4x2(X + n * C, C, Wt + r * C, Y + n * ldy + r, ldy, 4, 2);
            else mk_4x2(X + n * C, C, Wt + r * C, Y + n * ldy + r, ldy, nn, rr);
        }
    }
}

const qg_type_traits qg_traits_avx2[QG_TYPE_COUNT] = {
    [QG_TYPE_AQ] = {"aq", dequantize_rows_avx2, qg_aq_prep_size, prepare_avx2, vec_rows_avx2,
                    gemm_tile_avx2, .table_bits = 32},
    [QG_TYPE_VQ] = {"vq", qg_vq_dequantize_rows_avx2, qg_vq_prep_size, qg_vq_prepare_avx2,
                    qg_vq_vec_rows_avx2, gemm_tile_avx2}, /* qg_vq_avx2.c */
};

#include "qg_target_end.h"
#endif
