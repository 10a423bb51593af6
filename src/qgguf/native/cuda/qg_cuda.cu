// qgguf's CUDA kernels for its codebook tensor types (docs/FORMAT.md, "AQ tensors" and "VQ tensors").
//
// Compiled at run time by NVRTC (cupy.RawModule, see __init__.py); it includes no header: fp16 values travel as
// their 16-bit patterns (hbits) and are converted with the PTX cvt instructions, and the few vector types are
// our own. Template kernels are fetched by their name expressions (e.g. "aq_matvec_lut<2, 8>").
//
// Kernels (all take device pointers; sizes are ints, element offsets 64-bit):
//   aq_dequant<M, G, CODE, OUT>   W as float32 or fp16 rows, bit-identical to the numpy reference
//   aq_matvec_lut<M, G>           y = W x for 2^8-entry codebooks: per block, a lookup table of dot products
//                                 x_group . codebook_entry in shared memory, then gather-accumulate over codes
//   aq_matvec_direct<M,G,CODE,PRE> y = W x for any codebook size (2^16 entries: 1 MiB per codebook, L2-resident):
//                                 gathers codebook entries and takes their dot products with x
//   vq_dequant<V, OUT>            W as float32 or fp16 rows, bit-identical to the numpy reference
//   vq_matvec<V, STAGE, U>        y = W x: one warp per vector row, lanes over positions (U at a time), codebook
//                                 gathers (from shared memory when the chunk's codebooks fit: STAGE)
//   aq_matmul_direct<M,G,CODE,NT>, vq_matmul<V, NT>: Y = X W^T for up to NT tokens, each gathered entry used for
//                                 every token
//   reduce_parts(_n)              y[r] = scale[r] * sum_chunk part[chunk][r] (for N rows of outputs)
// PRE (direct, M <= 2): the first codes are loaded before the kernel's barrier, overlapping the staging of x.
// The matvec kernels split the inputs into chunks (grid x), each writing partial sums; a single chunk writes y
// directly, a few are added by the last block of each row block (finish_rows), many by reduce_parts.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned short hbits;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

struct alignas(8) u32x2 { u32 a, b; };
struct alignas(16) u32x4 { u32 a, b, c, d; };
struct alignas(16) f32x4 { float a, b, c, d; };

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float h2f(u32 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
    return f;
}

__device__ __forceinline__ hbits f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// IEEE single add / multiply that the compiler may not fuse into an FMA (VQ's add, multiply, add order)
__device__ __forceinline__ float add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// N consecutive fp16 values (N in 2, 4, 8, 16, 32) at p, aligned to min(2N, 16) bytes, as float
template <int N>
__device__ __forceinline__ void load_h(const hbits* __restrict__ p, float (&out)[N]) {
    if constexpr (N == 2) {
        u32 w = *reinterpret_cast<const u32*>(p);
        out[0] = h2f(w & 0xffffu);
        out[1] = h2f(w >> 16);
    } else if constexpr (N == 4) {
        u32x2 w = *reinterpret_cast<const u32x2*>(p);
        out[0] = h2f(w.a & 0xffffu); out[1] = h2f(w.a >> 16);
        out[2] = h2f(w.b & 0xffffu); out[3] = h2f(w.b >> 16);
    } else {
        static_assert(N % 8 == 0, "N must be 2, 4 or a multiple of 8");
#pragma unroll
        for (int c = 0; c < N / 8; ++c) {
            u32x4 w = reinterpret_cast<const u32x4*>(p)[c];
            out[8 * c + 0] = h2f(w.a & 0xffffu); out[8 * c + 1] = h2f(w.a >> 16);
            out[8 * c + 2] = h2f(w.b & 0xffffu); out[8 * c + 3] = h2f(w.b >> 16);
            out[8 * c + 4] = h2f(w.c & 0xffffu); out[8 * c + 5] = h2f(w.c >> 16);
            out[8 * c + 6] = h2f(w.d & 0xffffu); out[8 * c + 7] = h2f(w.d >> 16);
        }
    }
}

// G (4, 8, 16, 32) values v[i] * s to p (float or fp16 bits), p aligned to the vector width
template <int G>
__device__ __forceinline__ void store_scaled(float* __restrict__ p, const float (&v)[G], float s) {
#pragma unroll
    for (int c = 0; c < G / 4; ++c) {
        f32x4 o;
        o.a = v[4 * c] * s; o.b = v[4 * c + 1] * s; o.c = v[4 * c + 2] * s; o.d = v[4 * c + 3] * s;
        reinterpret_cast<f32x4*>(p)[c] = o;
    }
}

template <int G>
__device__ __forceinline__ void store_scaled(hbits* __restrict__ p, const float (&v)[G], float s) {
    if constexpr (G == 4) {
        u32x2 o;
        o.a = (u32)f2h(v[0] * s) | ((u32)f2h(v[1] * s) << 16);
        o.b = (u32)f2h(v[2] * s) | ((u32)f2h(v[3] * s) << 16);
        *reinterpret_cast<u32x2*>(p) = o;
    } else {
#pragma unroll
        for (int c = 0; c < G / 8; ++c) {
            u32x4 o;
            o.a = (u32)f2h(v[8 * c + 0] * s) | ((u32)f2h(v[8 * c + 1] * s) << 16);
            o.b = (u32)f2h(v[8 * c + 2] * s) | ((u32)f2h(v[8 * c + 3] * s) << 16);
            o.c = (u32)f2h(v[8 * c + 4] * s) | ((u32)f2h(v[8 * c + 5] * s) << 16);
            o.d = (u32)f2h(v[8 * c + 6] * s) | ((u32)f2h(v[8 * c + 7] * s) << 16);
            reinterpret_cast<u32x4*>(p)[c] = o;
        }
    }
}

__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(hbits* p, float v) { *p = f2h(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// a float written by other blocks of this launch (read through L2, not a possibly stale L1 line)
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// The matvec kernels split the inputs into gridDim.x chunks; block (bx, by) has written its partial sums
// part[bx][r] for the rows [r0, r1) of row block by. With `fin`, the last of the gridDim.x blocks of row block by
// to get here adds the chunks in chunk order (deterministic) and writes y[r] = scale[r] * sum (scales may be null),
// then resets its counter for the next launch (counters: one zeroed word per row block, owned by the tensor).
// Without `fin` a separate reduce_parts launch does this. Every thread of the block must call it.
__device__ __forceinline__ void finish_rows(const float* part, float* __restrict__ y, const float* __restrict__ scales,
                                            unsigned* counters, int fin, int R, int r0, int r1) {
    if (!fin || gridDim.x == 1) return;
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(counters + blockIdx.y, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
        float s = 0.0f;
#pragma unroll 8
        for (int c = 0; c < (int)gridDim.x; ++c) s += ld_cg(part + (i64)c * R + r);
        y[r] = scales ? s * scales[r] : s;
    }
    if (threadIdx.x == 0) counters[blockIdx.y] = 0u;
}

// ------------------------------------------------------------------------------------------------
// AQ: W[r, j*G + i] = scales[r] * (cb[0][codes[j][0][r]][i] + ... + cb[M-1][codes[j][M-1][r]][i])
// codes [J][M][R] (u8 for 2^8 entries, u16 for 2^16), cb [M][K][G] fp16, scales [R] float32 (fp16 scales are
// widened at upload: exact).

#define AQ_TR 32   // rows per dequant tile
#define AQ_TJ 32   // groups per dequant tile

// grid (ceil(R/32), ceil(J/32)), 256 threads. The codes of a 32x32 tile are staged in shared memory (read with
// the row index fastest, as stored), then each lane dequantizes one group of one row, so that a warp writes 32
// consecutive groups of a row. The sum runs in float32 in codebook order, then one multiply by the scale:
// the numpy reference's operations in its order (bit-identical).
template <int M, int G, typename CODE, typename OUT>
__global__ void __launch_bounds__(256) aq_dequant(const CODE* __restrict__ codes, const hbits* __restrict__ cb,
                                                  const float* __restrict__ scales, OUT* __restrict__ out,
                                                  int R, int J, int K) {
    constexpr int STRIDE = M * AQ_TR + 1;  // odd word stride per group: conflict-free reads across lanes
    __shared__ u32 sc[AQ_TJ * STRIDE];
    const int r0 = blockIdx.x * AQ_TR, j0 = blockIdx.y * AQ_TJ, tid = threadIdx.x;
    for (int t = tid; t < AQ_TJ * M * AQ_TR; t += 256) {
        const int rr = t % AQ_TR, jm = t / AQ_TR, jj = jm / M, m = jm - jj * M;
        const int r = r0 + rr, j = j0 + jj;
        u32 c = 0;
        if (r < R && j < J) c = codes[((i64)j * M + m) * R + r];
        sc[jj * STRIDE + m * AQ_TR + rr] = c;
    }
    __syncthreads();
    const int jj = tid & 31, j = j0 + jj;
    if (j >= J) return;
    const i64 C = (i64)J * G;
    for (int rr = tid >> 5; rr < AQ_TR; rr += 8) {
        const int r = r0 + rr;
        if (r >= R) break;
        float acc[G];
#pragma unroll
        for (int i = 0; i < G; ++i) acc[i] = 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const u32 c = sc[jj * STRIDE + m * AQ_TR + rr];
            float e[G];
            load_h<G>(cb + ((i64)m * K + c) * G, e);
#pragma unroll
            for (int i = 0; i < G; ++i) acc[i] = add_rn(acc[i], e[i]);
        }
        store_scaled<G>(out + (i64)r * C + (i64)j * G, acc, scales[r]);
    }
}

// grid (n_chunks, n_row_blocks), 256 threads, dynamic shared memory (jc*M*256 + jc*G) floats.
// Block (bx, by) takes the input groups [bx*jc, bx*jc + jc) and the rows [by*rpb, by*rpb + rpb):
//   1. xs = its slice of x;
//   2. lut[j][m][k] = dot(cb[m][k], xs_j) for its groups (thread k computes entry k of every table);
//   3. each thread gathers lut[j][m][codes[j][m][r]] for its rows (4 consecutive rows with one 32-bit load of
//      codes when vec4, i.e. R % 4 == 0) and writes the sum to part[bx][r], or, with a single chunk, the sum
//      times scales[r] to y[r] (part is y then); finish_rows adds the chunks when fin.
template <int M, int G>
__global__ void __launch_bounds__(256) aq_matvec_lut(const u8* __restrict__ codes, const hbits* __restrict__ cb,
                                                     const float* __restrict__ x, const float* __restrict__ scales,
                                                     float* part, float* __restrict__ y, unsigned* counters,
                                                     int fin, int R, int J, int jc, int rpb, int vec4) {
    extern __shared__ float smem[];
    float* lut = smem;
    float* xs = smem + jc * M * 256;
    const int tid = threadIdx.x;
    const int j0 = blockIdx.x * jc, nj = imin(jc, J - j0);
    const int r0 = blockIdx.y * rpb, r1 = imin(R, r0 + rpb);
    for (int t = tid; t < nj * G; t += 256) xs[t] = x[(i64)j0 * G + t];
    __syncthreads();
    const int nt = nj * M;
    if constexpr (M == 1) {          // one codebook: its entry, loaded once, against every group of the chunk
        float e[G];
        load_h<G>(cb + (i64)tid * G, e);
        for (int jj = 0; jj < nj; ++jj) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < G; ++i) d += e[i] * xs[jj * G + i];
            lut[jj * 256 + tid] = d;
        }
    } else {                         // table by table (measured faster for M >= 2 on an H100)
        for (int tab = 0; tab < nt; ++tab) {
            const int jj = tab / M, m = tab - jj * M;
            float e[G];
            load_h<G>(cb + ((i64)m * 256 + tid) * G, e);
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < G; ++i) d += e[i] * xs[jj * G + i];
            lut[tab * 256 + tid] = d;
        }
    }
    __syncthreads();
    const bool direct_out = gridDim.x == 1;
    float* dst = part + (i64)blockIdx.x * R;
    const u8* cbase = codes + (i64)j0 * M * R;
    if (vec4) {
        for (int r = r0 + tid * 4; r < r1; r += 1024) {
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            const u8* cp = cbase + r;
#pragma unroll 4
            for (int tab = 0; tab < nt; ++tab) {
                const u32 c = *reinterpret_cast<const u32*>(cp + (i64)tab * R);
                const float* L = lut + tab * 256;
                a0 += L[c & 255u];
                a1 += L[(c >> 8) & 255u];
                a2 += L[(c >> 16) & 255u];
                a3 += L[c >> 24];
            }
            if (direct_out) {
                a0 *= scales[r]; a1 *= scales[r + 1]; a2 *= scales[r + 2]; a3 *= scales[r + 3];
            }
            f32x4 o; o.a = a0; o.b = a1; o.c = a2; o.d = a3;
            *reinterpret_cast<f32x4*>(dst + r) = o;
        }
    } else {
        for (int r = r0 + tid; r < r1; r += 256) {
            float a = 0.0f;
            const u8* cp = cbase + r;
#pragma unroll 4
            for (int tab = 0; tab < nt; ++tab) a += lut[tab * 256 + cp[(i64)tab * R]];
            dst[r] = direct_out ? a * scales[r] : a;
        }
    }
    finish_rows(part, y, scales, counters, fin, R, r0, r1);
}

// grid (n_chunks, ceil(R/256)), 256 threads (one row each), dynamic shared memory jc*G floats.
// Block (bx, by) takes the input groups [bx*jc, bx*jc + jc): for each group and codebook it gathers the
// codebook entry of its row's code and accumulates its dot product with x's group.
template <int M, int G, typename CODE, bool PRE>
__global__ void __launch_bounds__(256) aq_matvec_direct(const CODE* __restrict__ codes,
                                                        const hbits* __restrict__ cb, int K,
                                                        const float* __restrict__ x,
                                                        const float* __restrict__ scales, float* part,
                                                        float* __restrict__ y, unsigned* counters, int fin,
                                                        int R, int J, int jc) {
    extern __shared__ float xs[];
    if constexpr (M <= 2) {           // 8 codes per thread at a time (PRE: the first 8 before the barrier)
        constexpr int PF = 8;
        const int tid = threadIdx.x;
        const int j0 = blockIdx.x * jc, nj = imin(jc, J - j0), nq = nj * M;
        const int r = blockIdx.y * 256 + tid;
        const CODE* cp = codes + (i64)j0 * M * R + r;        // code q = jj*M + m of the chunk at cp[q*R]
        u32 c[PF];
        if constexpr (PRE) {
#pragma unroll
            for (int u = 0; u < PF; ++u) c[u] = (r < R && u < nq) ? (u32)cp[(i64)u * R] : 0u;
        }
        for (int t = tid; t < nj * G; t += 256) xs[t] = x[(i64)j0 * G + t];
        __syncthreads();
        if (r < R) {
            float acc = 0.0f;
            for (int q0 = 0; q0 < nq; q0 += PF) {
                if (q0 > 0 || !PRE) {
#pragma unroll
                    for (int u = 0; u < PF; ++u) c[u] = q0 + u < nq ? (u32)cp[(i64)(q0 + u) * R] : 0u;
                }
#pragma unroll
                for (int u = 0; u < PF; ++u) {
                    const int q = q0 + u;
                    if (q < nq) {
                        const int jj = q / M, m = q - jj * M;
                        float e[G];
                        load_h<G>(cb + ((i64)m * K + c[u]) * G, e);
#pragma unroll
                        for (int i = 0; i < G; ++i) acc += e[i] * xs[jj * G + i];
                    }
                }
            }
            if (gridDim.x == 1)
                part[r] = acc * scales[r];
            else
                part[(i64)blockIdx.x * R + r] = acc;
        }
    } else {                          // M codes per group, two groups at a time (measured faster for M = 4)
        const int tid = threadIdx.x;
        const int j0 = blockIdx.x * jc, nj = imin(jc, J - j0);
        for (int t = tid; t < nj * G; t += 256) xs[t] = x[(i64)j0 * G + t];
        __syncthreads();
        const int r = blockIdx.y * 256 + tid;
        if (r < R) {
            const CODE* cp = codes + (i64)j0 * M * R + r;
            float acc = 0.0f;
#pragma unroll 2
            for (int jj = 0; jj < nj; ++jj) {
                u32 c[M];
#pragma unroll
                for (int m = 0; m < M; ++m) c[m] = cp[(i64)(jj * M + m) * R];
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float e[G];
                    load_h<G>(cb + ((i64)m * K + c[m]) * G, e);
#pragma unroll
                    for (int i = 0; i < G; ++i) acc += e[i] * xs[jj * G + i];
                }
            }
            if (gridDim.x == 1)
                part[r] = acc * scales[r];
            else
                part[(i64)blockIdx.x * R + r] = acc;
        }
    }
    finish_rows(part, y, scales, counters, fin, R, blockIdx.y * 256, imin(R, blockIdx.y * 256 + 256));
}

// Y = X W^T for N <= NT tokens (x: N rows of C floats, y: N rows of R): the direct kernel's gathers, each codebook
// entry used for every token. grid (n_chunks, ceil(R/256)), 256 threads, dynamic shared memory NT*jc*G floats.
// Writes part[bx][n*R + r] (y[n*R + r] times the scale with a single chunk); reduce_parts_n adds the chunks.
template <int M, int G, typename CODE, int NT>
__global__ void __launch_bounds__(256) aq_matmul_direct(const CODE* __restrict__ codes,
                                                        const hbits* __restrict__ cb, int K,
                                                        const float* __restrict__ x, int N,
                                                        const float* __restrict__ scales, float* __restrict__ part,
                                                        int R, int J, int jc) {
    constexpr int PF = 8;
    extern __shared__ float xs[];
    const int tid = threadIdx.x;
    const int j0 = blockIdx.x * jc, nj = imin(jc, J - j0), nq = nj * M, w = nj * G;
    const i64 C = (i64)J * G;
    for (int t = tid; t < NT * w; t += 256) {
        const int n = t / w, o = t - n * w;
        xs[t] = n < N ? x[(i64)n * C + (i64)j0 * G + o] : 0.0f;
    }
    __syncthreads();
    const int r = blockIdx.y * 256 + tid;
    if (r >= R) return;
    const CODE* cp = codes + (i64)j0 * M * R + r;
    float acc[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n] = 0.0f;
    for (int q0 = 0; q0 < nq; q0 += PF) {
        u32 c[PF];
#pragma unroll
        for (int u = 0; u < PF; ++u) c[u] = q0 + u < nq ? (u32)cp[(i64)(q0 + u) * R] : 0u;
#pragma unroll
        for (int u = 0; u < PF; ++u) {
            const int q = q0 + u;
            if (q < nq) {
                const int jj = q / M, m = q - jj * M;
                float e[G];
                load_h<G>(cb + ((i64)m * K + c[u]) * G, e);
#pragma unroll
                for (int n = 0; n < NT; ++n) {
#pragma unroll
                    for (int i = 0; i < G; ++i) acc[n] += e[i] * xs[n * w + jj * G + i];
                }
            }
        }
    }
    const i64 total = (i64)N * R;
    for (int n = 0; n < NT && n < N; ++n) {
        if (gridDim.x == 1)
            part[(i64)n * R + r] = acc[n] * scales[r];
        else
            part[(i64)blockIdx.x * total + (i64)n * R + r] = acc[n];
    }
}

// y[r] = (scales ? scales[r] : 1) * sum_c part[c][r]; grid ceil(R/32), 256 threads: 8 per row, each adding
// every 8th chunk, then a shuffle sum (8 short load chains instead of one long one)
extern "C" __global__ void __launch_bounds__(256) reduce_parts(const float* __restrict__ part, int nparts, int R,
                                                              const float* __restrict__ scales,
                                                              float* __restrict__ y) {
    const int r = blockIdx.x * 32 + (threadIdx.x >> 3), sub = threadIdx.x & 7;
    float s = 0.0f;
    if (r < R) {
#pragma unroll 4
        for (int c = sub; c < nparts; c += 8) s += part[(i64)c * R + r];
    }
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (r < R && sub == 0) y[r] = scales ? s * scales[r] : s;
}

// the same for N tokens: part[c][n*R + r], y[n*R + r] = scale[r] * sum_c part[c][n*R + r] for total = N*R entries
extern "C" __global__ void __launch_bounds__(256) reduce_parts_n(const float* __restrict__ part, int nparts, int total,
                                                                int R, const float* __restrict__ scales,
                                                                float* __restrict__ y) {
    const int e = blockIdx.x * 32 + (threadIdx.x >> 3), sub = threadIdx.x & 7;
    float s = 0.0f;
    if (e < total) {
#pragma unroll 4
        for (int c = sub; c < nparts; c += 8) s += part[(i64)c * total + e];
    }
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (e < total && sub == 0) y[e] = scales ? s * scales[e % R] : s;
}

// ------------------------------------------------------------------------------------------------
// VQ: W[b*V + i, perm[p]] = (book(p)[idx[b][p]][i] + rbook(p)[ridx[b][p - n_out]][i]) * colscale[p] + colbias[p]
// Index streams are uploaded as 32-bit words with 2 zero words of padding (an element is read from the 64-bit
// pair of aligned words that holds it). books: the outlier codebook first (when n_out > 0), then the G group
// codebooks, [(has_out + G)][k][V]; rbooks [G][kr][V].

__device__ __forceinline__ u32 get_bits(const u32* __restrict__ w, u64 bit, int nbits) {
    const u64 wi = bit >> 5;
    const u64 both = ((u64)w[wi + 1] << 32) | (u64)w[wi];
    return (u32)(both >> (bit & 31)) & ((1u << nbits) - 1u);
}

__device__ __forceinline__ int vq_book(int p, int n_out, int gs) {
    return p < n_out ? 0 : (n_out > 0) + (p - n_out) / gs;
}

// grid (ceil(C/256), min(nb, 65535)), 256 threads. Thread (c, b) writes rows b*V .. b*V+V-1 of original
// column c (position inv[c]): a warp writes consecutive columns. Add, multiply, add in float32 without FMA:
// bit-identical to the numpy reference.
template <int V, typename OUT>
__global__ void __launch_bounds__(256) vq_dequant(const u32* __restrict__ idxw, int kbits,
                                                  const u32* __restrict__ ridxw, int rbits,
                                                  const hbits* __restrict__ books, const hbits* __restrict__ rbooks,
                                                  const int* __restrict__ inv, const hbits* __restrict__ colscale,
                                                  const hbits* __restrict__ colbias, OUT* __restrict__ out,
                                                  int nb, int C, int n_out, int gs, int k, int kr) {
    const int c = blockIdx.x * 256 + threadIdx.x;
    if (c >= C) return;
    const int p = inv[c];
    const int bk = vq_book(p, n_out, gs);
    const bool res = kr > 0 && p >= n_out;
    const float s = h2f(colscale[p]), bias = h2f(colbias[p]);
    const int nc = C - n_out;
    for (int b = blockIdx.y; b < nb; b += gridDim.y) {
        const u32 code = get_bits(idxw, ((u64)b * C + p) * kbits, kbits);
        float e[V];
        load_h<V>(books + ((i64)bk * k + code) * V, e);
        if (res) {
            const u32 rc = get_bits(ridxw, ((u64)b * nc + (p - n_out)) * rbits, rbits);
            float re[V];
            load_h<V>(rbooks + ((i64)(bk - (n_out > 0)) * kr + rc) * V, re);
#pragma unroll
            for (int i = 0; i < V; ++i) e[i] = add_rn(e[i], re[i]);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) store1(out + ((i64)b * V + i) * C + c, add_rn(mul_rn(e[i], s), bias));
    }
}

// copy n fp16 values (n a multiple of 8, both pointers 16-byte aligned) from global to shared memory
__device__ __forceinline__ void stage16(hbits* dst, const hbits* __restrict__ src, i64 n) {
    const u32x4* s = reinterpret_cast<const u32x4*>(src);
    u32x4* d = reinterpret_cast<u32x4*>(dst);
    for (i64 t = threadIdx.x; t < n / 8; t += blockDim.x) d[t] = s[t];
}

// grid (n_chunks, n_row_blocks), 256 threads (8 warps), dynamic shared memory: 2*pc + 8 words, then (STAGE) the
// codebooks the chunk uses, nbk*k*V + nrb*kr*V fp16 values (the planner sizes nbk, nrb for the widest chunk).
// Block (bx, by) takes the positions [bx*pc, bx*pc + pc) and the vector rows [by*bpb, by*bpb + bpb):
//   1. xs[p] = x[perm[p]] * colscale[p], the position's codebook, and the chunk's bias term
//      sum_p x[perm[p]] * colbias[p] (the same for every row); with STAGE, the chunk's main (and residual)
//      codebooks into shared memory (gathers from shared memory are several times faster than from L1/L2);
//   2. each warp takes vector rows b in turn; lane l accumulates xs[p] * (entry + residual entry) over the
//      positions p = l, l + 32, ... (consecutive lanes read consecutive packed indices), then the warp sums the
//      V accumulators and lanes 0..V-1 write part[bx][b*V + i] (y directly with a single chunk), bias added;
//      finish_rows adds the chunks when fin.
template <int V, bool STAGE, int U>
__global__ void __launch_bounds__(256) vq_matvec(const u32* __restrict__ idxw, int kbits,
                                                 const u32* __restrict__ ridxw, int rbits,
                                                 const hbits* __restrict__ books, const hbits* __restrict__ rbooks,
                                                 const int* __restrict__ perm, const hbits* __restrict__ colscale,
                                                 const hbits* __restrict__ colbias, const float* __restrict__ x,
                                                 float* part, float* __restrict__ y, unsigned* counters, int fin,
                                                 int nb, int C, int n_out, int gs, int k, int kr, int pc, int bpb) {
    extern __shared__ float sm[];
    float* xs = sm;
    int* bks = reinterpret_cast<int*>(sm + pc);
    float* red = sm + 2 * pc;
    hbits* sbooks = reinterpret_cast<hbits*>(sm + 2 * pc + 8);      // 16-byte aligned: pc is a multiple of 32
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p0 = blockIdx.x * pc, np = imin(pc, C - p0);
    const int b0 = blockIdx.y * bpb, b1 = imin(nb, b0 + bpb);
    const int nc = C - n_out, has_out = n_out > 0;
    const int bk_lo = vq_book(p0, n_out, gs), bk_hi = vq_book(p0 + np - 1, n_out, gs);
    const int rb_lo = (p0 + np - 1 >= n_out) ? vq_book(p0 > n_out ? p0 : n_out, n_out, gs) - has_out : 0;
    const int rb_hi = (p0 + np - 1 >= n_out) ? bk_hi - has_out : -1;
    hbits* srbooks = sbooks + (i64)(bk_hi - bk_lo + 1) * k * V;
    if (STAGE) {
        stage16(sbooks, books + (i64)bk_lo * k * V, (i64)(bk_hi - bk_lo + 1) * k * V);
        if (kr > 0 && rb_hi >= rb_lo) stage16(srbooks, rbooks + (i64)rb_lo * kr * V, (i64)(rb_hi - rb_lo + 1) * kr * V);
    }
    float bsum = 0.0f;
    for (int t = tid; t < np; t += 256) {
        const int p = p0 + t;
        const float xv = x[perm[p]];
        xs[t] = xv * h2f(colscale[p]);
        bsum += xv * h2f(colbias[p]);
        bks[t] = vq_book(p, n_out, gs);
    }
    bsum = warp_sum(bsum);
    if (lane == 0) red[warp] = bsum;
    __syncthreads();
    float bias = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) bias += red[w];
    const i64 R = (i64)nb * V;
    float* dst = gridDim.x == 1 ? part : part + (i64)blockIdx.x * R;
    const hbits* mb = STAGE ? sbooks - (i64)bk_lo * k * V : books;        // indexed by the global book id
    const hbits* rbk = STAGE ? srbooks - (i64)rb_lo * kr * V : rbooks;
    for (int b = b0 + warp; b < b1; b += 8) {
        float acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.0f;
        const u64 e0 = (u64)b * C + p0;
        const i64 re0 = (i64)b * nc - n_out;
        // U positions per lane at a time: their packed indices are loaded before any codebook gather
        for (int t0 = lane; t0 < np; t0 += 32 * U) {
            u32 code[U], rc[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = t0 + 32 * u, p = p0 + t;
                code[u] = t < np ? get_bits(idxw, (e0 + t) * kbits, kbits) : 0u;
                rc[u] = (kr > 0 && t < np && p >= n_out) ? get_bits(ridxw, (u64)(re0 + p) * rbits, rbits) : 0u;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = t0 + 32 * u, p = p0 + t;
                if (t >= np) break;
                const int bk = bks[t];
                float e[V];
                load_h<V>(mb + ((i64)bk * k + code[u]) * V, e);
                if (kr > 0 && p >= n_out) {
                    float re[V];
                    load_h<V>(rbk + ((i64)(bk - has_out) * kr + rc[u]) * V, re);
#pragma unroll
                    for (int i = 0; i < V; ++i) e[i] += re[i];
                }
                const float xv = xs[t];
#pragma unroll
                for (int i = 0; i < V; ++i) acc[i] += xv * e[i];
            }
        }
        float mine = 0.0f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const float s = warp_sum(acc[i]);
            if (lane == i) mine = s;
        }
        if (lane < V) dst[(i64)b * V + lane] = mine + bias;
    }
    finish_rows(part, y, nullptr, counters, fin, (int)R, b0 * V, b1 * V);
}

// Y = X W^T for N <= NT tokens: vq_matvec (global gathers, one position per lane at a time) with every gathered
// entry used for each token; per-token bias terms. grid (n_chunks, n_row_blocks), 256 threads, dynamic shared
// memory NT*pc + pc + 8*NT words. Writes part[bx][n*R + b*V + i] (y directly with a single chunk), bias added;
// reduce_parts_n adds the chunks.
template <int V, int NT>
__global__ void __launch_bounds__(256) vq_matmul(const u32* __restrict__ idxw, int kbits,
                                                 const u32* __restrict__ ridxw, int rbits,
                                                 const hbits* __restrict__ books, const hbits* __restrict__ rbooks,
                                                 const int* __restrict__ perm, const hbits* __restrict__ colscale,
                                                 const hbits* __restrict__ colbias, const float* __restrict__ x,
                                                 int N, float* __restrict__ part, int nb, int C, int n_out, int gs,
                                                 int k, int kr, int pc, int bpb) {
    extern __shared__ float sm[];
    float* xs = sm;                                                   // [NT][pc]
    int* bks = reinterpret_cast<int*>(sm + NT * pc);
    float* red = sm + NT * pc + pc;                                   // [NT][8]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p0 = blockIdx.x * pc, np = imin(pc, C - p0);
    const int b0 = blockIdx.y * bpb, b1 = imin(nb, b0 + bpb);
    float bsum[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) bsum[n] = 0.0f;
    for (int t = tid; t < np; t += 256) {
        const int p = p0 + t;
        const int src = perm[p];
        const float s = h2f(colscale[p]), bi = h2f(colbias[p]);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const float xv = n < N ? x[(i64)n * C + src] : 0.0f;
            xs[n * pc + t] = xv * s;
            bsum[n] += xv * bi;
        }
        bks[t] = vq_book(p, n_out, gs);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const float v = warp_sum(bsum[n]);
        if (lane == 0) red[n * 8 + warp] = v;
    }
    __syncthreads();
    float bias[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        bias[n] = 0.0f;
#pragma unroll
        for (int ww = 0; ww < 8; ++ww) bias[n] += red[n * 8 + ww];
    }
    const int nc = C - n_out, has_out = n_out > 0;
    const i64 R = (i64)nb * V, total = (i64)N * R;
    float* dst = gridDim.x == 1 ? part : part + (i64)blockIdx.x * total;
    for (int b = b0 + warp; b < b1; b += 8) {
        float acc[NT][V];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[n][i] = 0.0f;
        const u64 e0 = (u64)b * C + p0;
        for (int t = lane; t < np; t += 32) {
            const int p = p0 + t;
            const int bk = bks[t];
            const u32 code = get_bits(idxw, (e0 + t) * kbits, kbits);
            float e[V];
            load_h<V>(books + ((i64)bk * k + code) * V, e);
            if (kr > 0 && p >= n_out) {
                const u32 rc = get_bits(ridxw, ((u64)b * nc + (p - n_out)) * rbits, rbits);
                float re[V];
                load_h<V>(rbooks + ((i64)(bk - has_out) * kr + rc) * V, re);
#pragma unroll
                for (int i = 0; i < V; ++i) e[i] += re[i];
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const float xv = xs[n * pc + t];
#pragma unroll
                for (int i = 0; i < V; ++i) acc[n][i] += xv * e[i];
            }
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            float mine = 0.0f;
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const float sv = warp_sum(acc[n][i]);
                if (lane == i) mine = sv;
            }
            if (n < N && lane < V) dst[(i64)n * R + (i64)b * V + lane] = mine + bias[n];
        }
    }
}
