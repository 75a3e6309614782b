/* Matrix products with weights kept in GGUF block formats (llmkit.engine.quant).
 *
 * W is [N, K] in one of the block formats below, each row ceil-free: K is a multiple of the block
 * size. y[m, n] = sum_k x[m, k] * W[n, k]. The activations x are first quantized per block of 32
 * to int8 with one float scale (d = max|x| / 127, q = round-half-even(x * 127 / max|x|)), with the
 * block's sum d * sum(q) and the integer sums of each half of 16: the weight blocks are then
 * multiplied in integers and scaled once per block (per sub-block for the K formats).
 *
 * Paths: AVX2 (+FMA, F16C) with maddubs, AVX-512 VNNI / AVX-VNNI dot products where the compiler
 * targets them, and portable C everywhere else. LLMKIT_SCALAR forces the portable path (tests).
 * The floating point here must not be contracted into fused multiply-adds where the result is
 * compared bit for bit (dequantize): build with -ffp-contract=off; the SIMD paths use explicit
 * fused multiply-adds where they want them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LLMKIT_SCALAR)
#define USE_AVX2 1
#include <immintrin.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#endif
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

int llmkit_block_elems(int t) { return t >= Q4_K ? 256 : 32; }

int llmkit_block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18;  case Q4_1: return 20;  case Q5_0: return 22;  case Q5_1: return 24;
    case Q8_0: return 34;  case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    default: return 0;
    }
}

/* Which SIMD path this build took: 0 portable, 1 AVX2, 2 AVX2 with VNNI dot products. */
int llmkit_simd_level(void) {
#if defined(USE_AVX2) && defined(DPBUSD)
    return 2;
#elif defined(USE_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ half, bfloat16 */

static inline float f16(const uint8_t* p) {
    uint16_t h; memcpy(&h, p, 2);
#ifdef USE_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (e == 0) {  /* zero or subnormal: man * 2^-24, exact in float */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    bits = e == 0x1f ? sign | 0x7f800000u | (man << 13) : sign | ((e + 112) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t to_f16(float f) {  /* round to nearest even, as numpy's astype(float16) */
#ifdef USE_AVX2
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00);      /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);     /* rounds past 65504: infinity */
    if (ax < 0x38800000u) {                                        /* below 2^-14: subnormal half */
        float a; memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 0x1p24f));
    }
    uint32_t r = ax - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
#endif
}

static inline float from_bf16(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------ unpacking, portable
 * Every format is unpacked to integers q and, per 16 values, a factor f and an offset o, with
 * weight = f * q + o (o only for the formats that have one: has_offset). */

static inline void k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
    if (j < 4) { *sc = s[j] & 63; *m = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

static int has_offset(int t) { return t == Q4_1 || t == Q5_1 || t == Q4_K || t == Q5_K; }

static void unpack(int t, const uint8_t* b, int8_t* q, float* f, float* o) {
    switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
        int hi = t == Q5_0 || t == Q5_1, off = t == Q4_1 || t == Q5_1;
        const uint8_t* qs = b + 2 + 2 * off + 4 * hi;
        uint32_t qh = 0;
        if (hi) memcpy(&qh, b + 2 + 2 * off, 4);
        int bias = off ? 0 : (hi ? 16 : 8);
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - bias);
            q[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - bias);
        }
        f[0] = f[1] = f16(b);
        o[0] = o[1] = off ? f16(b + 2) : 0.0f;
        break;
    }
    case Q8_0:
        memcpy(q, b + 2, 32);
        f[0] = f[1] = f16(b);
        o[0] = o[1] = 0.0f;
        break;
    case Q4_K: case Q5_K: {
        float d = f16(b), dmin = f16(b + 2);
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + (t == Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(b + 4, j, &sc, &m);
            f[2 * j] = f[2 * j + 1] = d * (float)sc;
            o[2 * j] = o[2 * j + 1] = -(dmin * (float)m);
            const uint8_t* c = qs + (j / 2) * 32;
            for (int l = 0; l < 32; l++) {
                int v = j & 1 ? c[l] >> 4 : c[l] & 15;
                if (t == Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                q[32 * j + l] = (int8_t)v;
            }
        }
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t* sc = (const int8_t*)(b + 192);
        float d = f16(b + 208);
        for (int i = 0; i < 16; i++) { f[i] = d * (float)sc[i]; o[i] = 0.0f; }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *a = ql + 64 * h, *hb = qh + 32 * h;
                int8_t* y = q + 128 * h;
                y[l] = (int8_t)(((a[l] & 15) | ((hb[l] & 3) << 4)) - 32);
                y[l + 32] = (int8_t)(((a[l + 32] & 15) | (((hb[l] >> 2) & 3) << 4)) - 32);
                y[l + 64] = (int8_t)(((a[l] >> 4) | (((hb[l] >> 4) & 3) << 4)) - 32);
                y[l + 96] = (int8_t)(((a[l + 32] >> 4) | (((hb[l] >> 6) & 3) << 4)) - 32);
            }
        break;
    }
    }
}

/* One block as float32 or bfloat16: f * q (+ o), the same float operations, in the same order,
 * as the gguf package's reference dequantization, so the results agree bit for bit. */
static void dequant_block(int t, const uint8_t* blk, float* outf, uint16_t* outb) {
    int E = llmkit_block_elems(t), off = has_offset(t);
    int8_t q[256]; float f[16], o[16], y[256];
    unpack(t, blk, q, f, o);
    if (off) for (int i = 0; i < E; i++) y[i] = f[i / 16] * (float)q[i] + o[i / 16];
    else for (int i = 0; i < E; i++) y[i] = f[i / 16] * (float)q[i];
    if (outf) memcpy(outf, y, sizeof(float) * E);
    else for (int i = 0; i < E; i++) outb[i] = to_bf16(y[i]);
}

/* ------------------------------------------------------------------ the packed layout
 * For the products, W is repacked once: rows in groups of 8 (the last group padded with zero
 * rows), and for each group the 8 rows' blocks b side by side in one "group block", so that one
 * 256-bit vector holds 4 consecutive values of each of the 8 rows and every SIMD lane works for one
 * output row: no horizontal sums, and each block's scales for 8 rows load as one vector. Fields of
 * a block (fixed per format): SCALAR (d, m, qh: stored [row][bytes]), QUADS (quantized values:
 * stored in 4-byte pieces, [piece][row][4]), BYTES_T (Q6_K scales: [byte][row]) and KSCALES (the
 * 12 bytes of 6-bit K scales and mins, stored decoded, [sub-block][row] bytes: 128 for 96). */

enum { F_SCALAR, F_QUADS, F_BYTES_T, F_KSCALES };
typedef struct { short off, size, kind; } Field;

static const Field F_Q4_0[] = {{0, 2, F_SCALAR}, {2, 16, F_QUADS}};
static const Field F_Q4_1[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 16, F_QUADS}};
static const Field F_Q5_0[] = {{0, 2, F_SCALAR}, {2, 4, F_SCALAR}, {6, 16, F_QUADS}};
static const Field F_Q5_1[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 4, F_SCALAR}, {8, 16, F_QUADS}};
static const Field F_Q8_0[] = {{0, 2, F_SCALAR}, {2, 32, F_QUADS}};
static const Field F_Q4_K[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 12, F_KSCALES}, {16, 128, F_QUADS}};
static const Field F_Q5_K[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 12, F_KSCALES}, {16, 32, F_QUADS}, {48, 128, F_QUADS}};
static const Field F_Q6_K[] = {{208, 2, F_SCALAR}, {192, 16, F_BYTES_T}, {0, 128, F_QUADS}, {128, 64, F_QUADS}};

static const Field* fields(int t, int* n) {
#define RET(F) { *n = (int)(sizeof(F) / sizeof(F[0])); return F; }
    switch (t) {
    case Q4_0: RET(F_Q4_0) case Q4_1: RET(F_Q4_1) case Q5_0: RET(F_Q5_0) case Q5_1: RET(F_Q5_1)
    case Q8_0: RET(F_Q8_0) case Q4_K: RET(F_Q4_K) case Q5_K: RET(F_Q5_K) default: RET(F_Q6_K)
    }
#undef RET
}

int llmkit_group_bytes(int t) {
    return 8 * llmkit_block_bytes(t) + (t == Q4_K || t == Q5_K ? 32 : 0);
}

/* Block b of row r <-> its place in group block gb. */
static void put_block(int t, const uint8_t* src, int r, uint8_t* gb) {
    int n, go = 0;
    const Field* f = fields(t, &n);
    for (int i = 0; i < n; i++) {
        const uint8_t* s = src + f[i].off;
        int z = f[i].size;
        if (f[i].kind == F_SCALAR) memcpy(gb + go + z * r, s, z);
        else if (f[i].kind == F_QUADS) for (int k = 0; k < z / 4; k++) memcpy(gb + go + 32 * k + 4 * r, s + 4 * k, 4);
        else if (f[i].kind == F_BYTES_T) for (int k = 0; k < z; k++) gb[go + 8 * k + r] = s[k];
        else for (int j = 0; j < 8; j++) { int sc, m; k_scale_min(s, j, &sc, &m); gb[go + 8 * j + r] = (uint8_t)sc; gb[go + 64 + 8 * j + r] = (uint8_t)m; }
        go += f[i].kind == F_KSCALES ? 128 : 8 * z;
    }
}

static void get_block(int t, const uint8_t* gb, int r, uint8_t* dst) {
    int n, go = 0;
    const Field* f = fields(t, &n);
    for (int i = 0; i < n; i++) {
        uint8_t* d = dst + f[i].off;
        int z = f[i].size;
        if (f[i].kind == F_SCALAR) memcpy(d, gb + go + z * r, z);
        else if (f[i].kind == F_QUADS) for (int k = 0; k < z / 4; k++) memcpy(d + 4 * k, gb + go + 32 * k + 4 * r, 4);
        else if (f[i].kind == F_BYTES_T) for (int k = 0; k < z; k++) d[k] = gb[go + 8 * k + r];
        else {
            uint8_t sc[8], m[8];
            for (int j = 0; j < 8; j++) { sc[j] = gb[go + 8 * j + r]; m[j] = gb[go + 64 + 8 * j + r]; }
            for (int j = 0; j < 4; j++) {
                d[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
                d[j + 4] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
                d[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
            }
        }
        go += f[i].kind == F_KSCALES ? 128 : 8 * z;
    }
}

/* W [N, K] as stored in GGUF -> the packed layout, ceil(N / 8) groups. */
void llmkit_pack(int t, const uint8_t* src, int64_t N, int64_t K, uint8_t* dst, int nthreads) {
    int64_t nb = K / llmkit_block_elems(t), B = llmkit_block_bytes(t), GB = llmkit_group_bytes(t);
    int64_t groups = (N + 7) / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K > 1000000)
    for (int64_t g = 0; g < groups; g++) {
        uint8_t zero[256] = {0};
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < 8; r++) {
                int64_t row = g * 8 + r;
                put_block(t, row < N ? src + (row * nb + b) * B : zero, r, dst + (g * nb + b) * GB);
            }
    }
}

/* Rows ids[0..n-1] (or 0..n-1 when ids is NULL) of packed W, dequantized into out [n, K]. */
void llmkit_dequantize(int t, const uint8_t* w, int64_t K, const int64_t* ids, int64_t n, void* out,
                       int out_bf16, int nthreads) {
    int64_t E = llmkit_block_elems(t), nb = K / E, GB = llmkit_group_bytes(t);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * K > 65536)
    for (int64_t i = 0; i < n; i++) {
        int64_t row = ids ? ids[i] : i;
        uint8_t blk[256];
        for (int64_t b = 0; b < nb; b++) {
            get_block(t, w + ((row / 8) * nb + b) * GB, (int)(row % 8), blk);
            if (out_bf16) dequant_block(t, blk, NULL, (uint16_t*)out + i * K + b * E);
            else dequant_block(t, blk, (float*)out + i * K + b * E, NULL);
        }
    }
}

/* ------------------------------------------------------------------ activations
 * x [M, K] (float32 or bfloat16) -> per row: q int8 [K], d float [K/32], s = d * sum(q) float
 * [K/32], b16 = sums of q per 16 int16 [K/16]. */

typedef struct { int8_t* q; float* d; float* s; int16_t* b16; int64_t K; } Act;

static void quantize_act_row(const void* x, int bf16, int64_t K, int8_t* q, float* d, float* s, int16_t* b16) {
    for (int64_t b = 0; b < K / 32; b++) {
#ifdef USE_AVX2
        __m256 v[4];
        for (int i = 0; i < 4; i++) {
            if (bf16) {
                __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)x + b * 32 + 8 * i));
                v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            } else {
                v[i] = _mm256_loadu_ps((const float*)x + b * 32 + 8 * i);
            }
        }
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], idv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], idv));
        __m256i lo = _mm256_add_epi32(i0, i1), hi = _mm256_add_epi32(i2, i3);
        __m128i l4 = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
        __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
        __m128i lh = _mm_hadd_epi32(l4, h4);
        lh = _mm_hadd_epi32(lh, lh);
        int s0 = _mm_cvtsi128_si32(lh), s1 = _mm_extract_epi32(lh, 1);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + b * 32), p);
#else
        float v[32], amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            v[i] = bf16 ? from_bf16(((const uint16_t*)x)[b * 32 + i]) : ((const float*)x)[b * 32 + i];
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            int qi = (int)lrintf(v[i] * id);
            q[b * 32 + i] = (int8_t)qi;
            if (i < 16) s0 += qi; else s1 += qi;
        }
#endif
        float dd = amax / 127.0f;
        d[b] = dd;
        s[b] = dd * (float)(s0 + s1);
        b16[2 * b] = (int16_t)s0;
        b16[2 * b + 1] = (int16_t)s1;
    }
}

/* For tests: the activation quantization exactly as the products see it. */
void llmkit_quantize_activations(const void* x, int bf16, int64_t M, int64_t K, int8_t* q, float* d, float* s,
                                 int16_t* b16) {
    for (int64_t m = 0; m < M; m++)
        quantize_act_row((const char*)x + m * K * (bf16 ? 2 : 4), bf16, K, q + m * K, d + m * (K / 32),
                         s + m * (K / 32), b16 + m * (K / 16));
}

/* ------------------------------------------------------------------ group products
 * One group block (8 weight rows x one block) against activation rows m0..m1-1: acc[m - m0]
 * (8 lanes: the 8 rows) += the block's part of their dot products. */

#ifdef USE_AVX2

typedef struct {
    __m256i w[64];      /* step k: values 4k..4k+3 of the block for each row (unsigned, Q8_0 signed) */
    __m256 dscale[8];   /* per 32 values: per row factor of the integer dot (times the activations' d) */
    __m256 fmin[8];     /* per 32 values: per row factor of the activations' block sum s */
    __m256i iscale[16]; /* Q6_K: per 16 values, each row's scale twice as int16 */
} Unpacked;

static inline __m256 ph8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256i ld(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline __m256 u8x8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256i bcast4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
#define M4 _mm256_set1_epi8(15)

static inline __m256i acc_u8s8(__m256i acc, __m256i u, __m256i s) {  /* acc + sums of 4 u8*s8 products */
#ifdef DPBUSD
    return DPBUSD(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline void nibbles(const uint8_t* q, int npieces, __m256i* lo, __m256i* hi) {
    for (int v = 0; v < npieces; v++) {
        __m256i raw = ld(q + 32 * v);
        lo[v] = _mm256_and_si256(raw, M4);
        hi[v] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), M4);
    }
}

static inline __m256i high_bits(__m256i qh, int shift) {  /* bit shift+i of each row's u32 -> byte i: 16 or 0 */
    __m256i v = _mm256_srl_epi32(qh, _mm_cvtsi32_si128(shift));
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    const __m256i bit = _mm256_set1_epi32(0x08040201);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

static inline void unpack_small(int t, const uint8_t* gb, Unpacked* u) {
    int off = t == Q4_1 || t == Q5_1, five = t == Q5_0 || t == Q5_1;
    __m256 d = ph8(gb);
    u->dscale[0] = d;
    u->fmin[0] = off ? ph8(gb + 16) : _mm256_mul_ps(d, _mm256_set1_ps(five ? -16.0f : -8.0f));
    if (t == Q8_0) {
        for (int k = 0; k < 8; k++) u->w[k] = ld(gb + 16 + 32 * k);
        return;
    }
    const uint8_t* q = gb + 16 + 16 * off + 32 * five;
    nibbles(q, 4, u->w, u->w + 4);
    if (five) {
        __m256i qh = ld(gb + 16 + 16 * off);
        for (int v = 0; v < 4; v++) {
            u->w[v] = _mm256_or_si256(u->w[v], high_bits(qh, 4 * v));
            u->w[v + 4] = _mm256_or_si256(u->w[v + 4], high_bits(qh, 16 + 4 * v));
        }
    }
}

static inline void unpack_k45(int t, const uint8_t* gb, Unpacked* u) {
    __m256 d = ph8(gb), negmin = _mm256_sub_ps(_mm256_setzero_ps(), ph8(gb + 16));
    for (int j = 0; j < 8; j++) {
        u->dscale[j] = _mm256_mul_ps(d, u8x8(gb + 32 + 8 * j));
        u->fmin[j] = _mm256_mul_ps(negmin, u8x8(gb + 96 + 8 * j));
    }
    const uint8_t* qs = gb + (t == Q5_K ? 416 : 160);
    for (int c = 0; c < 4; c++) {
        nibbles(qs + 256 * c, 8, u->w + 16 * c, u->w + 16 * c + 8);
        if (t == Q5_K)
            for (int v = 0; v < 8; v++) {
                __m256i h = _mm256_srl_epi16(ld(gb + 160 + 32 * v), _mm_cvtsi32_si128(2 * c));
                u->w[16 * c + v] = _mm256_or_si256(u->w[16 * c + v], _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4));
                u->w[16 * c + 8 + v] = _mm256_or_si256(u->w[16 * c + 8 + v], _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(2)), 3));
            }
    }
}

static inline void unpack_q6_k(const uint8_t* gb, Unpacked* u) {
    __m256 d = ph8(gb);
    for (int j = 0; j < 8; j++) u->dscale[j] = d;
    for (int k = 0; k < 16; k++) {
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(gb + 16 + 8 * k)));
        u->iscale[k] = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
    }
    const __m256i m2 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++)
        for (int v = 0; v < 8; v++) {
            __m256i l0 = ld(gb + 144 + 512 * h + 32 * v), l1 = ld(gb + 144 + 512 * h + 32 * (8 + v));
            __m256i hb = ld(gb + 1168 + 256 * h + 32 * v);
            __m256i* w = u->w + 32 * h + v;
            w[0] = _mm256_or_si256(_mm256_and_si256(l0, M4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
            w[8] = _mm256_or_si256(_mm256_and_si256(l1, M4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
            w[16] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), M4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
            w[24] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), M4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
        }
}

/* Integer dot products of 32 values for 8 rows. Unsigned weights of at most 15 (SPAN 8) or 31
 * (SPAN 4): that many maddubs products add up in int16 without saturating. */
static inline __attribute__((always_inline)) __m256i dot32_unsigned(const __m256i* w, const int8_t* x, const int span) {
    __m256i acc = _mm256_setzero_si256();
#ifdef DPBUSD
    (void)span;
    for (int k = 0; k < 8; k++) acc = DPBUSD(acc, w[k], bcast4(x + 4 * k));
#else
    for (int k0 = 0; k0 < 8; k0 += span) {
        __m256i p = _mm256_maddubs_epi16(w[k0], bcast4(x + 4 * k0));
        for (int k = k0 + 1; k < k0 + span; k++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[k], bcast4(x + 4 * k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    }
#endif
    return acc;
}

static inline __m256i dot32_signed(const __m256i* w, const int8_t* x) {  /* Q8_0: |w| times x with w's sign */
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) acc = acc_u8s8(acc, _mm256_sign_epi8(w[k], w[k]), _mm256_sign_epi8(bcast4(x + 4 * k), w[k]));
    return acc;
}

static inline __m256i dot32_q6(const __m256i* w, const __m256i* isc, const int8_t* x, const int16_t* xb) {
    __m256i acc = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++)  /* two sub-blocks of 16, one scale each; values 0..63: 2 products per int16 */
        for (int k = 4 * h; k < 4 * h + 4; k += 2) {
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w[k], bcast4(x + 4 * k)),
                                         _mm256_maddubs_epi16(w[k + 1], bcast4(x + 4 * k + 4)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, isc[h]));
        }
    /* the stored values are q + 32: take 32 * scale * sum(x) per sub-block off */
    __m256i c = _mm256_add_epi32(_mm256_madd_epi16(isc[0], _mm256_set1_epi32((uint16_t)xb[0])),
                                 _mm256_madd_epi16(isc[1], _mm256_set1_epi32((uint16_t)xb[1])));
    return _mm256_sub_epi32(acc, _mm256_slli_epi32(c, 5));
}

static inline __attribute__((always_inline)) void group_rows(const Unpacked* u, const Act* a, int64_t b, int64_t m0,
                                                              int64_t m1, __m256* acc, __m256* accmin, const int cls,
                                                              const int nsub) {
    int64_t K = a->K, n32 = K / 32;
    for (int64_t m = m0; m < m1; m++) {
        const int8_t* x = a->q + m * K + b * 32 * nsub;
        const float* xd = a->d + m * n32 + b * nsub;
        const float* xs = a->s + m * n32 + b * nsub;
        __m256 s = acc[m - m0], s2 = accmin[m - m0];
        for (int j = 0; j < nsub; j++) {
            __m256i i;
            if (cls == 0) i = dot32_unsigned(u->w + 8 * j, x + 32 * j, 8);
            else if (cls == 1) i = dot32_unsigned(u->w + 8 * j, x + 32 * j, 4);
            else if (cls == 2) i = dot32_signed(u->w + 8 * j, x + 32 * j);
            else i = dot32_q6(u->w + 8 * j, u->iscale + 2 * j, x + 32 * j, a->b16 + m * (K / 16) + b * 16 + 2 * j);
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(u->dscale[j], _mm256_set1_ps(xd[j])), s);
            if (cls < 2) s2 = _mm256_fmadd_ps(u->fmin[j], _mm256_set1_ps(xs[j]), s2);
        }
        acc[m - m0] = s;
        accmin[m - m0] = s2;
    }
}

static void group_block(int t, const uint8_t* gb, const Act* a, int64_t b, int64_t m0, int64_t m1, __m256* acc,
                        __m256* accmin) {
    Unpacked u;
    switch (t) {
    case Q4_0: case Q4_1: unpack_small(t, gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 0, 1); break;
    case Q5_0: case Q5_1: unpack_small(t, gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 1, 1); break;
    case Q8_0: unpack_small(t, gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 2, 1); break;
    case Q4_K: unpack_k45(t, gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 0, 8); break;
    case Q5_K: unpack_k45(t, gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 1, 8); break;
    case Q6_K: unpack_q6_k(gb, &u); group_rows(&u, a, b, m0, m1, acc, accmin, 3, 8); break;
    }
}

typedef __m256 Acc;
static inline void acc_zero(Acc* acc, int64_t n) { for (int64_t i = 0; i < n; i++) acc[i] = _mm256_setzero_ps(); }
static inline void acc_get(const Acc* acc, const Acc* accmin, float out[8]) {
    _mm256_storeu_ps(out, _mm256_add_ps(*acc, *accmin));
}

#else  /* portable: unpack each row's block and multiply value by value */

typedef struct { float v[8]; } Acc;
static inline void acc_zero(Acc* acc, int64_t n) { memset(acc, 0, sizeof(Acc) * n); }
static inline void acc_get(const Acc* acc, const Acc* accmin, float out[8]) {
    for (int r = 0; r < 8; r++) out[r] = acc->v[r] + accmin->v[r];
}

static void group_block(int t, const uint8_t* gb, const Act* a, int64_t b, int64_t m0, int64_t m1, Acc* acc,
                        Acc* accmin) {
    int E = llmkit_block_elems(t), off = has_offset(t);
    int64_t K = a->K;
    uint8_t blk[256];
    int8_t q[8][256];
    float f[8][16], o[8][16];
    for (int r = 0; r < 8; r++) {
        get_block(t, gb, r, blk);
        unpack(t, blk, q[r], f[r], o[r]);
    }
    for (int64_t m = m0; m < m1; m++) {
        const int8_t* xq = a->q + m * K + b * E;
        const float* xd = a->d + m * (K / 32) + b * (E / 32);
        const int16_t* xb = a->b16 + m * (K / 16) + b * (E / 16);
        for (int r = 0; r < 8; r++) {
            float sum = 0.0f, sum2 = 0.0f;
            for (int h = 0; h < E / 16; h++) {
                int dot = 0;
                for (int i = 0; i < 16; i++) dot += q[r][16 * h + i] * xq[16 * h + i];
                sum += xd[h / 2] * f[r][h] * (float)dot;
                if (off) sum2 += xd[h / 2] * o[r][h] * (float)xb[h];
            }
            acc[m - m0].v[r] += sum;
            accmin[m - m0].v[r] += sum2;
        }
    }
}
#endif

/* ------------------------------------------------------------------ the product
 * y [M, N] = x [M, K] @ W.T, W packed, x and y float32 or bfloat16. OpenMP over groups of 8
 * output rows: each thread takes one contiguous range of groups (one sequential stream of
 * weights); each group block is unpacked once for up to MBLOCK activation rows, which stay in
 * cache while the thread's weights pass by. */

#define MBLOCK 64

void llmkit_matmul(int t, const uint8_t* w, int64_t N, int64_t K, const void* x, int x_bf16, void* y, int y_bf16,
                   int64_t M, int nthreads) {
    int64_t n32 = K / 32, E = llmkit_block_elems(t), nb = K / E, GB = llmkit_group_bytes(t), groups = (N + 7) / 8;
    int8_t* buf = malloc((size_t)(M * K + M * n32 * 8 + M * (K / 16) * 2) + 64);
    if (!buf) return;
    Act a = {buf, (float*)(buf + ((M * K + 31) & ~31)), NULL, NULL, K};
    a.s = a.d + M * n32;
    a.b16 = (int16_t*)(a.s + M * n32);
    int serial = M * K <= 16384;
    if (serial) llmkit_quantize_activations(x, x_bf16, M, K, a.q, a.d, a.s, a.b16);
    #pragma omp parallel num_threads(nthreads) if (N * K > 65536)
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        if (!serial) {
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++)
                quantize_act_row((const char*)x + m * K * (x_bf16 ? 2 : 4), x_bf16, K, a.q + m * K, a.d + m * n32,
                                 a.s + m * n32, a.b16 + m * (K / 16));
        }
        int64_t per = (groups + nt - 1) / nt, g0 = id * per, g1 = g0 + per < groups ? g0 + per : groups;
        Acc acc[MBLOCK], accmin[MBLOCK];
        for (int64_t mb = 0; mb < M; mb += MBLOCK) {
            int64_t me = mb + MBLOCK < M ? mb + MBLOCK : M;
            for (int64_t g = g0; g < g1; g++) {
                acc_zero(acc, me - mb);
                acc_zero(accmin, me - mb);
                for (int64_t b = 0; b < nb; b++) group_block(t, w + (g * nb + b) * GB, &a, b, mb, me, acc, accmin);
                int rows = N - g * 8 < 8 ? (int)(N - g * 8) : 8;
                for (int64_t m = mb; m < me; m++) {
                    float out[8];
                    acc_get(acc + (m - mb), accmin + (m - mb), out);
                    if (y_bf16) for (int r = 0; r < rows; r++) ((uint16_t*)y)[m * N + g * 8 + r] = to_bf16(out[r]);
                    else memcpy((float*)y + m * N + g * 8, out, sizeof(float) * rows);
                }
            }
        }
    }
    free(buf);
}

/* ------------------------------------------------------------------ quantizing float weights */

static void quant_q8_0(const float* x, uint8_t* out) {  /* as gguf.quants: d = max|x| / 127, round half away */
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = to_f16(d);
    memcpy(out, &h, 2);
    for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

static void quant_q4_0_q5_0(const float* x, uint8_t* out, int five) {  /* as gguf.quants */
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < 32; i++) if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); mx = x[i]; }
    float d = mx / (five ? -16.0f : -8.0f), id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = to_f16(d);
    memcpy(out, &h, 2);
    int top = five ? 31 : 15;
    uint32_t qh = 0;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float v = truncf(x[i] * id + (five ? 16.5f : 8.5f));
        int qi = v < 0.0f ? 0 : (v > (float)top ? top : (int)v);
        q[i] = (uint8_t)qi;
        qh |= (uint32_t)((qi >> 4) & 1) << i;
    }
    uint8_t* qs = out + (five ? 6 : 2);
    if (five) memcpy(out + 2, &qh, 4);
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

/* Q4_K: each sub-block of 32 gets the scale and minimum that fit it best in least squares (a few
 * rounds of: assign levels, refit scale and minimum), then the eight scales and minimums are
 * stored in 6 bits against the block's largest, and the levels assigned again with the stored
 * values. */
static void fit_sub(const float* x, float* scale, float* mn) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; }
    if (lo > 0.0f) lo = 0.0f;  /* the format subtracts a non-negative minimum */
    float s = (hi - lo) / 15.0f, m = -lo;
    if (s <= 0.0f) { *scale = 0.0f; *mn = m; return; }
    for (int it = 0; it < 4; it++) {
        double sq = 0, sx = 0, sqq = 0, sqx = 0;
        for (int i = 0; i < 32; i++) {
            float v = nearbyintf((x[i] + m) / s);
            v = v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v);
            sq += v; sx += x[i]; sqq += v * v; sqx += v * x[i];
        }
        double det = 32.0 * sqq - sq * sq;
        if (det <= 0.0) break;
        double ns = (32.0 * sqx - sq * sx) / det, nm = -(sx - ns * sq) / 32.0;
        if (ns <= 0.0 || nm < 0.0) break;
        s = (float)ns; m = (float)nm;
    }
    *scale = s; *mn = m;
}

static void quant_q4_k(const float* x, uint8_t* out) {
    float sc[8], mn[8], smax = 0.0f, mmax = 0.0f;
    for (int j = 0; j < 8; j++) {
        fit_sub(x + 32 * j, &sc[j], &mn[j]);
        smax = sc[j] > smax ? sc[j] : smax;
        mmax = mn[j] > mmax ? mn[j] : mmax;
    }
    float d = smax / 63.0f, dmin = mmax / 63.0f;
    uint16_t hd = to_f16(d), hm = to_f16(dmin);
    memcpy(out, &hd, 2);
    memcpy(out + 2, &hm, 2);
    d = f16(out); dmin = f16(out + 2);  /* assign levels against the stored values */
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; j++) {
        int a = d > 0.0f ? (int)nearbyintf(sc[j] / d) : 0, b = dmin > 0.0f ? (int)nearbyintf(mn[j] / dmin) : 0;
        ls[j] = (uint8_t)(a > 63 ? 63 : (a < 0 ? 0 : a));
        lm[j] = (uint8_t)(b > 63 ? 63 : (b < 0 ? 0 : b));
    }
    uint8_t* s = out + 4;
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
    uint8_t* qs = out + 16;
    for (int j = 0; j < 8; j++) {
        float f = d * (float)ls[j], o = dmin * (float)lm[j];
        for (int l = 0; l < 32; l++) {
            int v = f > 0.0f ? (int)nearbyintf((x[32 * j + l] + o) / f) : 0;
            v = v < 0 ? 0 : (v > 15 ? 15 : v);
            uint8_t* c = qs + (j / 2) * 32 + l;
            *c = j & 1 ? (uint8_t)((*c & 15) | (v << 4)) : (uint8_t)v;
        }
    }
}

/* x [N, K] float32 -> W in format t (Q8_0, Q4_0, Q5_0 or Q4_K); 0, or -1 for a format it cannot write. */
int llmkit_quantize(int t, const float* x, int64_t N, int64_t K, uint8_t* out, int nthreads) {
    if (t != Q8_0 && t != Q4_0 && t != Q5_0 && t != Q4_K) return -1;
    int E = llmkit_block_elems(t), B = llmkit_block_bytes(t);
    int64_t nb = N * (K / E);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        const float* src = x + i * E;
        uint8_t* dst = out + i * B;
        if (t == Q8_0) quant_q8_0(src, dst);
        else if (t == Q4_K) quant_q4_k(src, dst);
        else quant_q4_0_q5_0(src, dst, t == Q5_0);
    }
    return 0;
}
