/* VQ kernels, AVX-512: dequantization of vectors of 16 in one 512-bit lane; the matvec runs the AVX2
 * kernels (faster, see below; every AVX-512 CPU the core selects has AVX2). */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#include "qg_target_begin.h"
#include <immintrin.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))
#define VQ_SIDE(t) ((const qg_vq_side *)(t)->aux1)

/* matvec: the AVX2 kernels.  Measured on 4096x11008 (one thread): four 256-bit vector rows per pass
 * beat one 512-bit row for v=16 (1.9 against 2.6 ms; 2.5 against 3.9 ms with a residual stream). */
void qg_vq_vec_rows_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1) {
    qg_vq_vec_rows_avx2(t, x, prep, y, r0, r1);
}

/* dequantize: v = 16 in one lane (add, multiply, add: exact), else the AVX2 path */
void qg_vq_dequantize_rows_avx512(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], gs = t->iparam[5];
    const int rbits = (int)t->iparam[1];
    if (v != 16) { qg_vq_dequantize_rows_avx2(t, r0, r1, out); return; }
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    float q[16] __attribute__((aligned(64)));
    for (int64_t b = r0 / v; b * v < r1; b++) {
        const int64_t i0 = b * v < r0 ? r0 - b * v : 0;
        const int64_t i1 = b * v + v > r1 ? r1 - b * v : v;
        for (int64_t p = 0; p < C; p++) {
            const uint32_t ix = qg_vq_get(s, b * C + p, t->B);
            __m512 c;
            if (p < n_out) c = _mm512_loadu_ps(sd->obook + (int64_t)ix * v);
            else {
                const int64_t g = (p - n_out) / gs;
                c = _mm512_loadu_ps(t->codebooks + (g * k + ix) * v);
                if (rbits)
                    c = _mm512_add_ps(c, _mm512_loadu_ps(sd->rbooks +
                                         (g * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v));
            }
            c = _mm512_add_ps(_mm512_mul_ps(c, _mm512_set1_ps(t->scales[p])), _mm512_set1_ps(sd->colbias[p]));
            _mm512_store_ps(q, c);
            float *o = out + (b * v - r0) * C + sd->perm[p];
            for (int64_t i = i0; i < i1; i++) o[i * C] = q[i];
        }
    }
}

#include "qg_target_end.h"
#endif
