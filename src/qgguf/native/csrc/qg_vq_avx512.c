/* VQ kernels, AVX-512: vectors of 16 in one 512-bit lane (dequantize-and-dot, as the AVX2 file);
 * other vector lengths run the AVX2 kernels (every AVX-512 CPU the core selects has AVX2). */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#include "qg_target_begin.h"
#include <immintrin.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))
#define VQ_SIDE(t) ((const qg_vq_side *)(t)->aux1)

AI uint32_t get_bits(const uint8_t *s, uint64_t pos, const int bits) {
    uint32_t w;
    memcpy(&w, s + (pos >> 3), 4);
    return (w >> (pos & 7)) & ((1u << bits) - 1u);
}

AI void rows_16(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1, const int KB,
                const int RB) {
    const int64_t V = 16, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], G = t->iparam[4], gs = t->iparam[5];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    for (int64_t b = b0; b < b1; b++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        uint64_t pos = (uint64_t)(b * C) * KB;
        int64_t p = 0;
        for (; p < n_out; p++, pos += KB)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(prep[p]),
                                 _mm512_loadu_ps(sd->obook + (int64_t)get_bits(s, pos, KB) * V), a0);
        uint64_t rpos = (uint64_t)(b * nc) * (RB ? RB : 1);
        for (int64_t g = 0; g < G; g++) {
            const int64_t pe = n_out + (g + 1) * gs < C ? n_out + (g + 1) * gs : C;
            const float *book = t->codebooks + g * k * V;
            const float *rbook = RB ? sd->rbooks + g * kr * V : NULL;
            for (; p + 2 <= pe; p += 2, pos += 2 * KB) {
                __m512 c0 = _mm512_loadu_ps(book + (int64_t)get_bits(s, pos, KB) * V);
                __m512 c1 = _mm512_loadu_ps(book + (int64_t)get_bits(s, pos + KB, KB) * V);
                if (RB) {
                    c0 = _mm512_add_ps(c0, _mm512_loadu_ps(rbook + (int64_t)get_bits(rs, rpos, RB) * V));
                    c1 = _mm512_add_ps(c1, _mm512_loadu_ps(rbook + (int64_t)get_bits(rs, rpos + RB, RB) * V));
                    rpos += 2 * RB;
                }
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(prep[p]), c0, a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(prep[p + 1]), c1, a1);
            }
            for (; p < pe; p++, pos += KB) {
                __m512 c = _mm512_loadu_ps(book + (int64_t)get_bits(s, pos, KB) * V);
                if (RB) {
                    c = _mm512_add_ps(c, _mm512_loadu_ps(rbook + (int64_t)get_bits(rs, rpos, RB) * V));
                    rpos += RB;
                }
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(prep[p]), c, a0);
            }
        }
        _mm512_storeu_ps(y + b * V, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(beta)));
    }
}

#define VQ_RB_CASES(CALL, KB)                                            \
    switch (rb) {                                                        \
    case 0: CALL(KB, 0); break;                                          \
    case 8: CALL(KB, 8); break;                                          \
    case 4: CALL(KB, 4); break;                                          \
    case 6: CALL(KB, 6); break;                                          \
    case 10: CALL(KB, 10); break;                                        \
    case 12: CALL(KB, 12); break;                                        \
    default: CALL(KB, rb);                                               \
    }

void qg_vq_vec_rows_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1) {
    const int64_t v = t->M;
    const int kb = t->B, rb = (int)t->iparam[1];
    if (v != 16 || r0 % v || r1 % v) { qg_vq_vec_rows_avx2(t, x, prep, y, r0, r1); return; }
    const int64_t b0 = r0 / v, b1 = r1 / v;
    int done = 1;
#define CALL16(K, R) rows_16(t, prep, y, b0, b1, K, R)
    switch (kb) {
    case 8: VQ_RB_CASES(CALL16, 8); break;
    case 10: VQ_RB_CASES(CALL16, 10); break;
    case 12: VQ_RB_CASES(CALL16, 12); break;
    case 16: VQ_RB_CASES(CALL16, 16); break;
    default: VQ_RB_CASES(CALL16, kb);
    }
    if (!done) qg_vq_vec_rows_scalar(t, x, prep, y, r0, r1);
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
