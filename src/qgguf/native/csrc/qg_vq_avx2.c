/* VQ kernels, AVX2 + FMA.  Small codebooks (k, kr <= 16): register lookup tables (below).  Otherwise
 * dequantize-and-dot: a vector row b (v output rows) accumulates
 * xs[p] * centroid(p, idx[b][p]) over the column positions p with v-wide FMAs (v = 8, 16: 256-bit
 * lanes; v = 4: 128-bit), the packed indices decoded on the fly (the bit width is a compile-time
 * constant for the common widths, so that the decode folds to a few shifts).  Other v: scalar. */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx2,fma,f16c"
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

/* ---- four vector rows at once (v = 4, 8, 16): one broadcast of xs[p] feeds four independent
 * FMA chains, one per vector row and its own index stream ---- */
#define BLK4_BODY(VT, ZERO, BCAST, LOAD, ADD, FMA, STORE, SET1, LANE)                                  \
    const int64_t V = LANE * NV, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];    \
    const int64_t kr = t->iparam[2], G = t->iparam[4], gs = t->iparam[5];                              \
    const qg_vq_side *sd = VQ_SIDE(t);                                                                 \
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;                     \
    VT a[4][4];                                                                                        \
    uint64_t pos[4], rpos[4];                                                                          \
    for (int u = 0; u < 4; u++) {                                                                      \
        for (int h = 0; h < NV; h++) a[u][h] = ZERO();                                                 \
        pos[u] = (uint64_t)((b + u) * C) * KB;                                                         \
        rpos[u] = (uint64_t)((b + u) * nc) * (RB ? RB : 1);                                            \
    }                                                                                                  \
    int64_t p = 0;                                                                                     \
    for (; p < n_out; p++) {                                                                           \
        const VT xv = BCAST(prep + p);                                                                 \
        for (int u = 0; u < 4; u++) {                                                                  \
            const float *e = sd->obook + (int64_t)get_bits(s, pos[u], KB) * V;                         \
            pos[u] += KB;                                                                              \
            for (int h = 0; h < NV; h++) a[u][h] = FMA(xv, LOAD(e + LANE * h), a[u][h]);               \
        }                                                                                              \
    }                                                                                                  \
    for (int64_t g = 0; g < G; g++) {                                                                  \
        const int64_t pe = n_out + (g + 1) * gs < C ? n_out + (g + 1) * gs : C;                        \
        const float *book = t->codebooks + g * k * V;                                                  \
        const float *rbook = RB ? sd->rbooks + g * kr * V : NULL;                                      \
        for (; p < pe; p++) {                                                                          \
            const VT xv = BCAST(prep + p);                                                             \
            for (int u = 0; u < 4; u++) {                                                              \
                const float *e = book + (int64_t)get_bits(s, pos[u], KB) * V;                          \
                pos[u] += KB;                                                                          \
                if (RB) {                                                                              \
                    const float *re = rbook + (int64_t)get_bits(rs, rpos[u], RB) * V;                  \
                    rpos[u] += RB;                                                                     \
                    for (int h = 0; h < NV; h++)                                                       \
                        a[u][h] = FMA(xv, ADD(LOAD(e + LANE * h), LOAD(re + LANE * h)), a[u][h]);      \
                } else {                                                                               \
                    for (int h = 0; h < NV; h++) a[u][h] = FMA(xv, LOAD(e + LANE * h), a[u][h]);       \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    const VT bv = SET1(beta);                                                                          \
    for (int u = 0; u < 4; u++)                                                                        \
        for (int h = 0; h < NV; h++) STORE(y + (b + u) * V + LANE * h, ADD(a[u][h], bv));

AI void blk4_256(const qg_tensor *t, const float *prep, float *y, int64_t b, float beta, const int KB,
                 const int RB, const int NV) {
    BLK4_BODY(__m256, _mm256_setzero_ps, _mm256_broadcast_ss, _mm256_loadu_ps, _mm256_add_ps, _mm256_fmadd_ps,
              _mm256_storeu_ps, _mm256_set1_ps, 8)
}

AI void blk4_128(const qg_tensor *t, const float *prep, float *y, int64_t b, float beta, const int KB,
                 const int RB) {
    const int NV = 1;
    BLK4_BODY(__m128, _mm_setzero_ps, _mm_broadcast_ss, _mm_loadu_ps, _mm_add_ps, _mm_fmadd_ps, _mm_storeu_ps,
              _mm_set1_ps, 4)
}

/* ---- v = 8 or 16: NV 256-bit lanes per vector ---- */
AI void rows_w(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1, const int KB,
               const int RB, const int NV) {
    const int64_t V = 8 * NV, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], G = t->iparam[4], gs = t->iparam[5];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    if (!RB)   /* with a residual stream the single-row kernel is faster (register pressure) */
        for (; b0 + 4 <= b1; b0 += 4) blk4_256(t, prep, y, b0, beta, KB, RB, NV);
    for (int64_t b = b0; b < b1; b++) {
        __m256 a[4][2];
        for (int u = 0; u < 4; u++) a[u][0] = a[u][1] = _mm256_setzero_ps();
        uint64_t pos = (uint64_t)(b * C) * KB;
        int64_t p = 0;
        /* outlier columns: their own codebook, no residual */
        for (; p < n_out; p++, pos += KB) {
            const float *e = sd->obook + (int64_t)get_bits(s, pos, KB) * V;
            const __m256 xv = _mm256_broadcast_ss(prep + p);
            for (int h = 0; h < NV; h++) a[0][h] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(e + 8 * h), a[0][h]);
        }
        uint64_t rpos = (uint64_t)(b * nc) * (RB ? RB : 1);
        for (int64_t g = 0; g < G; g++) {
            const int64_t pe = n_out + (g + 1) * gs < C ? n_out + (g + 1) * gs : C;
            const float *book = t->codebooks + g * k * V;
            if (RB == 8 && KB == 8) {
                /* byte indices (vq-v8-k256-256, VPTQ's 2-bit layout): eight of each stream per 64-bit load, and
                   xs[p + u] spread from one 8-wide load by vpermps (a broadcast load costs a shuffle slot besides
                   the load on Zen 5, and the loads bound this loop: 2 centroids per position).  8192x2048, one
                   thread: 1.07 -> 0.70 ms */
                const float *rbook = sd->rbooks + g * kr * V;
                const uint8_t *ms = s + (pos >> 3), *rr = rs + (rpos >> 3);
                for (; p + 8 <= pe; p += 8, pos += 64, rpos += 64, ms += 8, rr += 8) {
                    uint64_t mw, rw;
                    memcpy(&mw, ms, 8);
                    memcpy(&rw, rr, 8);
                    const __m256 x8 = _mm256_loadu_ps(prep + p);
#pragma GCC unroll 8
                    for (int u = 0; u < 8; u++) {
                        const float *e = book + (int64_t)((mw >> (8 * u)) & 255) * V;
                        const float *re = rbook + (int64_t)((rw >> (8 * u)) & 255) * V;
                        const __m256 xv = _mm256_permutevar8x32_ps(x8, _mm256_set1_epi32(u));
                        for (int h = 0; h < NV; h++)
                            a[u & 3][h] = _mm256_fmadd_ps(xv, _mm256_add_ps(_mm256_loadu_ps(e + 8 * h),
                                                                            _mm256_loadu_ps(re + 8 * h)), a[u & 3][h]);
                    }
                }
                for (; p < pe; p++, pos += KB, rpos += RB) {
                    const float *e = book + (int64_t)get_bits(s, pos, KB) * V;
                    const float *re = rbook + (int64_t)get_bits(rs, rpos, RB) * V;
                    const __m256 xv = _mm256_broadcast_ss(prep + p);
                    for (int h = 0; h < NV; h++)
                        a[0][h] = _mm256_fmadd_ps(xv, _mm256_add_ps(_mm256_loadu_ps(e + 8 * h),
                                                                    _mm256_loadu_ps(re + 8 * h)), a[0][h]);
                }
            } else if (RB) {
                const float *rbook = sd->rbooks + g * kr * V;
                for (; p + 4 <= pe; p += 4, pos += 4 * KB, rpos += 4 * RB) {
                    for (int u = 0; u < 4; u++) {
                        const float *e = book + (int64_t)get_bits(s, pos + u * KB, KB) * V;
                        const float *re = rbook + (int64_t)get_bits(rs, rpos + u * RB, RB) * V;
                        const __m256 xv = _mm256_broadcast_ss(prep + p + u);
                        for (int h = 0; h < NV; h++)
                            a[u][h] = _mm256_fmadd_ps(xv, _mm256_add_ps(_mm256_loadu_ps(e + 8 * h),
                                                                        _mm256_loadu_ps(re + 8 * h)), a[u][h]);
                    }
                }
                for (; p < pe; p++, pos += KB, rpos += RB) {
                    const float *e = book + (int64_t)get_bits(s, pos, KB) * V;
                    const float *re = rbook + (int64_t)get_bits(rs, rpos, RB) * V;
                    const __m256 xv = _mm256_broadcast_ss(prep + p);
                    for (int h = 0; h < NV; h++)
                        a[0][h] = _mm256_fmadd_ps(xv, _mm256_add_ps(_mm256_loadu_ps(e + 8 * h),
                                                                    _mm256_loadu_ps(re + 8 * h)), a[0][h]);
                }
            } else {
                for (; p + 4 <= pe; p += 4, pos += 4 * KB) {
                    for (int u = 0; u < 4; u++) {
                        const float *e = book + (int64_t)get_bits(s, pos + u * KB, KB) * V;
                        const __m256 xv = _mm256_broadcast_ss(prep + p + u);
                        for (int h = 0; h < NV; h++)
                            a[u][h] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(e + 8 * h), a[u][h]);
                    }
                }
                for (; p < pe; p++, pos += KB) {
                    const float *e = book + (int64_t)get_bits(s, pos, KB) * V;
                    const __m256 xv = _mm256_broadcast_ss(prep + p);
                    for (int h = 0; h < NV; h++) a[0][h] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(e + 8 * h), a[0][h]);
                }
            }
        }
        const __m256 bv = _mm256_set1_ps(beta);
        for (int h = 0; h < NV; h++) {
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(a[0][h], a[1][h]), _mm256_add_ps(a[2][h], a[3][h]));
            _mm256_storeu_ps(y + b * V + 8 * h, _mm256_add_ps(sum, bv));
        }
    }
}

/* ---- v = 4: 128-bit lanes ---- */
AI void rows_4(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1, const int KB,
               const int RB) {
    const int64_t V = 4, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], G = t->iparam[4], gs = t->iparam[5];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    for (; b0 + 4 <= b1; b0 += 4) blk4_128(t, prep, y, b0, beta, KB, RB);
    for (int64_t b = b0; b < b1; b++) {
        __m128 a[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
        uint64_t pos = (uint64_t)(b * C) * KB;
        int64_t p = 0;
        for (; p < n_out; p++, pos += KB) {
            const float *e = sd->obook + (int64_t)get_bits(s, pos, KB) * V;
            a[0] = _mm_fmadd_ps(_mm_broadcast_ss(prep + p), _mm_loadu_ps(e), a[0]);
        }
        uint64_t rpos = (uint64_t)(b * nc) * (RB ? RB : 1);
        for (int64_t g = 0; g < G; g++) {
            const int64_t pe = n_out + (g + 1) * gs < C ? n_out + (g + 1) * gs : C;
            const float *book = t->codebooks + g * k * V;
            const float *rbook = RB ? sd->rbooks + g * kr * V : NULL;
            for (; p < pe; p++, pos += KB) {
                __m128 c = _mm_loadu_ps(book + (int64_t)get_bits(s, pos, KB) * V);
                if (RB) {
                    c = _mm_add_ps(c, _mm_loadu_ps(rbook + (int64_t)get_bits(rs, rpos, RB) * V));
                    rpos += RB;
                }
                a[1] = _mm_fmadd_ps(_mm_broadcast_ss(prep + p), c, a[1]);
            }
        }
        const __m128 sum = _mm_add_ps(_mm_add_ps(a[0], a[1]), _mm_add_ps(a[2], a[3]));
        _mm_storeu_ps(y + b * V, _mm_add_ps(sum, _mm_set1_ps(beta)));
    }
}

/* ---- small codebooks (k <= 16, kr <= 16 or none): register lookup tables, 8 positions per ymm ----
 * As the AVX-512 kernel (qg_vq_avx512.c): for vector row b and component i, y[b*v+i] accumulates
 * xs[p] * T_i[idx(b, p)] over 8 consecutive positions at once.  The 8 packed indices (<= 32 bits + the
 * bit offset, inside a 16-byte window) go to 32-bit lanes with one byte shuffle and a variable shift;
 * vpermps looks up entries 0..7 of a component, and for k > 8 a second vpermps (entries 8..15) and a
 * blend on index bit 3 (moved to the sign bit) pick the entry. */
#define VQS_TABF 8192 /* floats of transposed tables on the stack (32 KiB) */

/* tab[i*16 + j] = book[j*V + i] for j < k, 0 beyond */
static void vqs_tables(const float *book, int64_t k, int64_t V, float *tab) {
    for (int64_t i = 0; i < V; i++)
        for (int64_t j = 0; j < 16; j++) tab[i * 16 + j] = j < k ? book[j * V + i] : 0.f;
}

typedef struct {
    const uint8_t *p;
    __m256i ctrl, sh, msk;
    int off, w, safe;
} vqs_stream;

/* cs[off] and cs[8 + off]: the shuffle control and shifts of width w at bit offset off */
static void vqs_ctrls(int w, __m256i *cs) {
    for (int off = 0; off < 8; off++) {
        int32_t c[8], s[8];
        for (int j = 0; j < 8; j++) {
            const int bit = off + j * w;
            c[j] = (bit >> 3) * 0x01010101 + 0x03020100;
            s[j] = bit & 7;
        }
        cs[off] = _mm256_loadu_si256((const __m256i *)c);
        cs[8 + off] = _mm256_loadu_si256((const __m256i *)s);
    }
}

AI void vqs_open(vqs_stream *st, const uint8_t *s, uint64_t nbytes, uint64_t e0, uint64_t e1, int w,
                 const __m256i *cs) {
    const uint64_t bit = e0 * (uint64_t)w;
    st->p = s + (bit >> 3);
    st->w = w;
    st->off = (int)(bit & 7);
    st->ctrl = cs[st->off];
    st->sh = cs[8 + st->off];
    st->msk = _mm256_set1_epi32((1 << w) - 1);
    /* the last full step starts at element e1 - 8 or before; its 16-byte window must stay inside */
    st->safe = e1 < e0 + 8 || (((e1 - 8) * (uint64_t)w) >> 3) + 16 <= nbytes;
}

/* NM: the lookup reads only the w low bits (w = 3 with k <= 8; w = 4 with k <= 16: bits 0..2 and the
 * blend's bit 3) */
AI __m256i vqs_spread(const vqs_stream *st, __m256i win, const int NM) {
    const __m256i v = _mm256_srlv_epi32(_mm256_shuffle_epi8(win, st->ctrl), st->sh);
    return NM ? v : _mm256_and_si256(v, st->msk);
}

/* a window of the n elements at st->p, read byte-exactly (near the stream end, and for tails) */
AI __m256i vqs_window_exact(const vqs_stream *st, int64_t n) {
    uint8_t tmp[16] = {0};
    memcpy(tmp, st->p, (size_t)((st->off + n * st->w + 7) >> 3));
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tmp));
}

AI __m256i vqs_next(vqs_stream *st, const int NM) {
    const __m256i win = st->safe ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)st->p))
                                 : vqs_window_exact(st, 8);
    st->p += st->w;
    return vqs_spread(st, win, NM);
}

AI __m256 vqs_look(const __m256 lo, const __m256 hi, __m256i ix, const int K16) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, ix);
    if (!K16) return a;
    return _mm256_blendv_ps(a, _mm256_permutevar8x32_ps(hi, ix), _mm256_castsi256_ps(_mm256_slli_epi32(ix, 28)));
}

/* positions [p, pe) of one vector row */
AI void vqs_seg(const float *prep, int64_t p, int64_t pe, vqs_stream *ms, vqs_stream *rs, const float *mt,
                const float *rt, __m256 *acc, const int V, const int RES, const int K16, const int NM) {
    for (; p + 8 <= pe; p += 8) {
        const __m256 xv = _mm256_loadu_ps(prep + p);
        const __m256i mi = vqs_next(ms, NM);
        const __m256i ri = RES ? vqs_next(rs, NM) : mi;
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) {
            __m256 c = vqs_look(_mm256_load_ps(mt + i * 16), _mm256_load_ps(mt + i * 16 + 8), mi, K16);
            if (RES) c = _mm256_add_ps(c, vqs_look(_mm256_load_ps(rt + i * 16), _mm256_load_ps(rt + i * 16 + 8), ri, K16));
            acc[i] = _mm256_fmadd_ps(xv, c, acc[i]);
        }
    }
    if (p < pe) {
        const int64_t n = pe - p;
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 xv = _mm256_maskload_ps(prep + p, lanes);
        const __m256i mi = vqs_spread(ms, vqs_window_exact(ms, n), NM);
        const __m256i ri = RES ? vqs_spread(rs, vqs_window_exact(rs, n), NM) : mi;
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) {
            __m256 c = vqs_look(_mm256_load_ps(mt + i * 16), _mm256_load_ps(mt + i * 16 + 8), mi, K16);
            if (RES) c = _mm256_add_ps(c, vqs_look(_mm256_load_ps(rt + i * 16), _mm256_load_ps(rt + i * 16 + 8), ri, K16));
            acc[i] = _mm256_blendv_ps(acc[i], _mm256_fmadd_ps(xv, c, acc[i]), _mm256_castsi256_ps(lanes));
        }
    }
}

AI float vqs_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AI void vqs_range(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1, const float *tabs,
                  const __m256i *cs, const int V, const int RES, const int K16, const int NM) {
    const int64_t C = t->C, n_out = t->iparam[3], nc = C - n_out, G = t->iparam[4], gs = t->iparam[5];
    const int kb = t->B, rb = (int)t->iparam[1];
    const uint64_t nb = (uint64_t)(t->R / V);
    const uint64_t mbytes = qg_vq_stream_bytes(nb * C, kb), rbytes = RES ? qg_vq_stream_bytes(nb * nc, rb) : 0;
    const uint8_t *s = (const uint8_t *)t->codes, *rsb = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    for (int64_t b = b0; b < b1; b++) {
        __m256 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) acc[i] = _mm256_setzero_ps();
        vqs_stream ms, rs;
        if (n_out) {
            vqs_open(&ms, s, mbytes, b * C, b * C + n_out, kb, cs);
            vqs_seg(prep, 0, n_out, &ms, NULL, tabs, NULL, acc, V, 0, K16, NM);
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t p0 = n_out + g * gs, p1 = p0 + gs < C ? p0 + gs : C;
            if (p0 >= p1) break;
            vqs_open(&ms, s, mbytes, b * C + p0, b * C + p1, kb, cs);
            if (RES) vqs_open(&rs, rsb, rbytes, b * nc + p0 - n_out, b * nc + p1 - n_out, rb, cs + 16);
            const float *mt = tabs + (1 + g) * (RES ? 2 : 1) * V * 16;
            vqs_seg(prep, p0, p1, &ms, &rs, mt, mt + V * 16, acc, V, RES, K16, NM);
        }
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) y[b * V + i] = vqs_hsum(acc[i]) + beta;
    }
}

/* 1 if the register-table kernel ran rows [r0, r1) */
static int vqs_try(const qg_tensor *t, const float *prep, float *y, int64_t r0, int64_t r1) {
    const int64_t V = t->M, k = t->iparam[0], kr = t->iparam[2], G = t->iparam[4], n_out = t->iparam[3];
    const int RES = kr > 0;
    if (k > 16 || kr > 16 || r0 % V || r1 % V) return 0;
    const int64_t per = (RES ? 2 : 1) * V * 16;
    if ((1 + G) * per > VQS_TABF) return 0;
    float tabs[VQS_TABF] __attribute__((aligned(32)));
    const qg_vq_side *sd = VQ_SIDE(t);
    if (n_out) vqs_tables(sd->obook, k, V, tabs);
    for (int64_t g = 0; g < G; g++) {
        vqs_tables(t->codebooks + g * k * V, k, V, tabs + (1 + g) * per);
        if (RES) vqs_tables(sd->rbooks + g * kr * V, kr, V, tabs + (1 + g) * per + V * 16);
    }
    __m256i cs[32];
    vqs_ctrls(t->B, cs);
    if (RES) vqs_ctrls((int)t->iparam[1], cs + 16);
    const int K16 = k > 8 || kr > 8, wl = K16 ? 4 : 3;
    const int NM = t->B == wl && (!RES || t->iparam[1] == wl);
    const int64_t b0 = r0 / V, b1 = r1 / V;
#define VQS_NM(VV, R_, K_)                                                                           \
    if (NM) vqs_range(t, prep, y, b0, b1, tabs, cs, VV, R_, K_, 1);                                   \
    else vqs_range(t, prep, y, b0, b1, tabs, cs, VV, R_, K_, 0);
#define VQS_CASE(VV)                                                                                 \
    case VV:                                                                                         \
        if (RES) { if (K16) { VQS_NM(VV, 1, 1) } else { VQS_NM(VV, 1, 0) } }                          \
        else { if (K16) { VQS_NM(VV, 0, 1) } else { VQS_NM(VV, 0, 0) } }                              \
        return 1;
    switch (V) {
    VQS_CASE(2)
    VQS_CASE(4)
    VQS_CASE(8)
    VQS_CASE(16)
    default: return 0;
    }
#undef VQS_CASE
#undef VQS_NM
}

/* dispatch on (v, index bits, residual bits) to compile-time constants for the common cases */
#define VQ_RB_CASES(CALL, KB)                                            \
    switch (rb) {                                                        \
    case 0: CALL(KB, 0); break;                                          \
    case 1: CALL(KB, 1); break;                                          \
    case 8: CALL(KB, 8); break;                                          \
    case 4: CALL(KB, 4); break;                                          \
    case 6: CALL(KB, 6); break;                                          \
    case 10: CALL(KB, 10); break;                                        \
    case 12: CALL(KB, 12); break;                                        \
    default: CALL(KB, rb);  /* any other width: decoded with a run-time shift */ \
    }
#define VQ_KB_CASES(CALL)                                                \
    switch (kb) {                                                        \
    case 8: VQ_RB_CASES(CALL, 8); break;                                 \
    case 10: VQ_RB_CASES(CALL, 10); break;                               \
    case 12: VQ_RB_CASES(CALL, 12); break;                               \
    case 16: VQ_RB_CASES(CALL, 16); break;                               \
    case 6: VQ_RB_CASES(CALL, 6); break;                                 \
    case 4: VQ_RB_CASES(CALL, 4); break;                                 \
    case 7: VQ_RB_CASES(CALL, 7); break;                                 \
    default: VQ_RB_CASES(CALL, kb);                                      \
    }

void qg_vq_vec_rows_avx2(const qg_tensor *t, const float *x, const float *prep, float *y,
                         int64_t r0, int64_t r1) {
    const int64_t v = t->M;
    const int kb = t->B, rb = (int)t->iparam[1];
    const int64_t b0 = r0 / v, b1 = r1 / v;
    int done = 1;
    if (vqs_try(t, prep, y, r0, r1)) return;
    if (r0 % v || r1 % v) done = 0;
    else if (v == 8) {
#define CALL8(K, R) rows_w(t, prep, y, b0, b1, K, R, 1)
        VQ_KB_CASES(CALL8)
    } else if (v == 16) {
#define CALL16(K, R) rows_w(t, prep, y, b0, b1, K, R, 2)
        VQ_KB_CASES(CALL16)
    } else if (v == 4) {
#define CALL4(K, R) rows_4(t, prep, y, b0, b1, K, R)
        VQ_KB_CASES(CALL4)
    } else done = 0;
    if (!done) qg_vq_vec_rows_scalar(t, x, prep, y, r0, r1);
}

void qg_vq_prepare_avx2(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    /* a permuted gather: the scalar loop is as fast as anything here */
    qg_vq_prepare_scalar(t, x, prep, j0, j1);
}

/* ---- dequantize: the vector of position p computed v-wide (add, multiply, add: exact),
 * then written to its v rows of column perm[p] ---- */
void qg_vq_dequantize_rows_avx2(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], gs = t->iparam[5];
    const int rbits = (int)t->iparam[1];
    if (v != 4 && v != 8 && v != 16) { qg_vq_dequantize_rows_scalar(t, r0, r1, out); return; }
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    float q[16] __attribute__((aligned(32)));
    for (int64_t b = r0 / v; b * v < r1; b++) {
        const int64_t i0 = b * v < r0 ? r0 - b * v : 0;
        const int64_t i1 = b * v + v > r1 ? r1 - b * v : v;
        for (int64_t p = 0; p < C; p++) {
            const uint32_t ix = qg_vq_get(s, b * C + p, t->B);
            const float *e;
            const float *re = NULL;
            if (p < n_out) e = sd->obook + (int64_t)ix * v;
            else {
                const int64_t g = (p - n_out) / gs;
                e = t->codebooks + (g * k + ix) * v;
                if (rbits) re = sd->rbooks + (g * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v;
            }
            if (v == 4) {
                __m128 c = _mm_loadu_ps(e);
                if (re) c = _mm_add_ps(c, _mm_loadu_ps(re));
                _mm_store_ps(q, _mm_add_ps(_mm_mul_ps(c, _mm_set1_ps(t->scales[p])), _mm_set1_ps(sd->colbias[p])));
            }
            const __m256 sc = _mm256_set1_ps(t->scales[p]), bi = _mm256_set1_ps(sd->colbias[p]);
            for (int64_t h = 0; h < v && v >= 8; h += 8) {
                __m256 c = _mm256_loadu_ps(e + h);
                if (re) c = _mm256_add_ps(c, _mm256_loadu_ps(re + h));
                _mm256_store_ps(q + h, _mm256_add_ps(_mm256_mul_ps(c, sc), bi));
            }
            float *o = out + (b * v - r0) * C + sd->perm[p];
            for (int64_t i = i0; i < i1; i++) o[i * C] = q[i];
        }
    }
}

#include "qg_target_end.h"
#endif
