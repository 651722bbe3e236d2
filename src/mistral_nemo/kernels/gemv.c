/* Matrix-vector products for batch-1 decoding on the CPU: out[r] = dot(w[r, :], x).
 *
 * Decoding one token reads every weight once, so its speed is set by memory bandwidth.
 * torch's bf16 GEMV reaches about 2/3 of it on AVX-512 machines; this streams each weight
 * row once with independent accumulators and keeps up with the memory. Rows are shared by
 * `threads` POSIX threads. Also here: products of up to a few dozen vectors (`gemv`), and a
 * whole decode step (`decode_step`). Built at first use with -march=native.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const void *w, *x;
    float *out;
    long rows, cols;
    int kind;          /* 0: bf16 (x bf16), 1: fp32 (x fp32), 2: fp8 e4m3fn (x bf16),
                          3: int4 (x bf16, with sz and xsum), 4: int8 (xq, xs, row_scale),
                          5: int4 dequantized into out [rows, cols] */
    long next;         /* next unclaimed row, taken `chunk` rows at a time by all threads */
    const uint16_t *sz; /* int4: [rows, groups, 2] bf16 (scale, zero) */
    const float *xsum;  /* int4, per vector: sum of x per group, then (VNNI) the scale of xq
                           per group, then 8 * scale * sum(xq) per group */
    long group;
    const int8_t *xq;   /* per vector: int4 (VNNI): x quantized per group, even then odd
                           columns; int8: x quantized per group of 128, in order */
    const float *xs;    /* int8, per vector: xq's scale per group, then 128 * the sum over
                           groups of scale * sum(xq) */
    const float *row_scale; /* int8: per output row */
    long batch;         /* x holds `batch` vectors (kinds 0-4), out [batch, rows] */
    void (*each)(const void *ctx, long row); /* any other job: called for each row */
    const void *ctx;
    long chunk;         /* rows per claim (0: CHUNK) */
} job_t;

/* Rows are claimed in small chunks rather than split in equal halves up front, so a thread
 * slowed by the rest of the machine does not leave the others idle at the end. */
enum { CHUNK = 64 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float dot_bf16(const uint16_t *w, const uint16_t *x, long n) {
    long c = 0;
    float tail = 0.f;
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 128 <= n; c += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + c), (__m512bh)_mm512_loadu_si512(x + c));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + c + 32), (__m512bh)_mm512_loadu_si512(x + c + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + c + 64), (__m512bh)_mm512_loadu_si512(x + c + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + c + 96), (__m512bh)_mm512_loadu_si512(x + c + 96));
    }
    for (; c < n; c += 32) { /* the last 1..127 columns, the final block masked */
        __mmask32 m = n - c >= 32 ? 0xFFFFFFFFu : (1u << (n - c)) - 1;
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + c),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + c));
    }
    tail = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; c < n; c++) tail += bf16_to_f32(w[c]) * bf16_to_f32(x[c]);
    return tail;
}

static float dot_f32(const float *w, const float *x, long n) {
    long c = 0;
    float tail = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 64 <= n; c += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
    }
    for (; c < n; c += 16) { /* the last 1..63 columns, the final block masked */
        __mmask16 m = n - c >= 16 ? 0xFFFF : (1u << (n - c)) - 1;
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, x + c), a0);
    }
    tail = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; c < n; c++) tail += w[c] * x[c];
    return tail;
}

#if defined(__AVX512BF16__)
/* 32 float8_e4m3fn bytes to bf16, by moving bits: for normal numbers the exponent is
 * rebiased (+120) and the 3 mantissa bits move to the top of bf16's 7; the 7 subnormals
 * come from a table. (NaN is not handled: the quantizer never produces it.) */
static const uint16_t FP8_SUBNORMAL_BF16[32] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20,
                                                0x3C40, 0x3C60};

static inline __m512i fp8x32_to_bf16(__m256i bytes) {
    __m512i b = _mm512_cvtepu8_epi16(bytes);
    __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
    __m512i em = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));
    __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(em, 4), _mm512_set1_epi16(120 << 7));
    __mmask32 sub = _mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(8));
    __m512i table = _mm512_loadu_si512(FP8_SUBNORMAL_BF16);
    __m512i v = _mm512_mask_mov_epi16(normal, sub, _mm512_permutexvar_epi16(em, table));
    return _mm512_or_si512(v, sign);
}
#endif

static float fp8_to_f32(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    float v = e ? (1.f + m / 8.f) * (float)(1 << e) / 128.f : m / 512.f;
    return b & 0x80 ? -v : v;
}

static float dot_fp8(const uint8_t *w, const uint16_t *x, long n) {
    long c = 0;
    float tail = 0.f;
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; c + 64 <= n; c += 64) {
        __m512i bytes = _mm512_loadu_si512(w + c);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)fp8x32_to_bf16(_mm512_castsi512_si256(bytes)),
                              (__m512bh)_mm512_loadu_si512(x + c));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)fp8x32_to_bf16(_mm512_extracti64x4_epi64(bytes, 1)),
                              (__m512bh)_mm512_loadu_si512(x + c + 32));
    }
    tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; c < n; c++) tail += fp8_to_f32(w[c]) * bf16_to_f32(x[c]);
    return tail;
}

/* One row of an int4 matrix: `w` holds cols/2 bytes (value 2i in the low nibble of byte i),
 * `sz` the row's (scale, zero) bf16 pairs, one per group of `group` columns, so that
 * w = (q - 8) * scale + zero. `xsum` holds the sum of x over each group.
 * dot = sum over groups of scale * sum(q x) + (zero - 8 scale) * sum(x). */
static float dot_int4(const uint8_t *w, const uint16_t *x, const uint16_t *sz,
                      const float *xsum, long n, long group) {
    long groups = n / group;
    float out = 0.f;
#if defined(__AVX512BF16__)
    static const uint32_t BF16_OF[16] = {0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0,
                                         0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140,
                                         0x4150, 0x4160, 0x4170};
    const __m512i table = _mm512_loadu_si512(BF16_OF);
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 total = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m512 acc = _mm512_setzero_ps();
        for (long c = g * group; c < (g + 1) * group; c += 32) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + c / 2)));
            __m512i lo = _mm512_permutexvar_epi32(_mm512_and_si512(b, low4), table);
            __m512i hi = _mm512_permutexvar_epi32(_mm512_srli_epi32(b, 4), table);
            __m512i pairs = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
            acc = _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)_mm512_loadu_si512(x + c));
        }
        total = _mm512_fmadd_ps(acc, _mm512_set1_ps(bf16_to_f32(sz[2 * g])), total);
    }
    out = _mm512_reduce_add_ps(total);
#else
    for (long g = 0; g < groups; g++) {
        float q = 0.f;
        for (long c = g * group; c < (g + 1) * group; c++)
            q += (float)((w[c / 2] >> (4 * (c & 1))) & 15) * bf16_to_f32(x[c]);
        out += bf16_to_f32(sz[2 * g]) * q;
    }
#endif
    for (long g = 0; g < groups; g++)
        out += (bf16_to_f32(sz[2 * g + 1]) - 8.f * bf16_to_f32(sz[2 * g])) * xsum[g];
    return out;
}

#if defined(__AVX512VNNI__)
/* int4 x int8: x quantized to int8 per group (as llama.cpp does for its CPU dot products),
 * 128 products per pair of VNNI instructions. `xq` holds the even columns of x, then the
 * odd ones, to match the low and high nibbles of 64 weight bytes. Lane i of the 32-bit sums
 * covers columns 8i..8i+7 of a 128-column block, so groups of 32 or 64 get their factors by
 * a lane permutation. A last block of fewer than 128 columns is masked.
 *
 * Groups are taken 16 at a time: first their factors, f = scale * xs for the products, and
 * the terms that do not involve the weights' nibbles, zero * sum(x) - 8 scale * xs *
 * sum(xq) (the activations' rounding errors are so weighted by the centred q - 8, not by
 * q, whose mean of 7.5 would give about 3x more error); then their blocks, each taking its
 * lanes of f by a permutation (in registers: a round trip through memory stalls on store
 * forwarding), two at a time on two accumulators. */
static inline __m512i int4_block(__m512i w, __m512i x_even, __m512i x_odd) {
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, low4), x_even);
    return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), low4), x_odd);
}

static float dot_int4_vnni(const uint8_t *w, const int8_t *xq, const float *xs,
                           const float *xsq, const uint16_t *sz, const float *xsum, long n,
                           long group) {
    const long groups = n / group, full = n / 128, blocks = (n + 127) / 128;
    const int8_t *xe = xq, *xo = xq + n / 2;
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_group = _mm512_srli_epi32(_mm512_slli_epi32(iota, 3), __builtin_ctzl(group));
    const __m512i per_block = _mm512_set1_epi32((int)(128 / group));
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, fixed = t0;
    for (long g = 0, blk = 0; g < groups; g += 16) {
        __mmask16 gm = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        /* the groups' (scale, zero) bf16 pairs as 32-bit words: the scale is the low half */
        __m512i pairs = _mm512_maskz_loadu_epi32(gm, sz + 2 * g);
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high16));
        __m512 f = _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(gm, xs + g));
        fixed = _mm512_fmadd_ps(zero, _mm512_maskz_loadu_ps(gm, xsum + g), fixed);
        fixed = _mm512_fnmadd_ps(scale, _mm512_maskz_loadu_ps(gm, xsq + g), fixed);
        const long stop = blk + 16 * group / 128 < blocks ? blk + 16 * group / 128 : blocks;
        const long stop_full = stop < full ? stop : full;
        __m512i lanes = lane_group;
        for (; blk + 1 < stop_full; blk += 2) { /* two whole blocks, two accumulators */
            __m512i a0 = int4_block(_mm512_loadu_si512(w + 64 * blk),
                                    _mm512_loadu_si512(xe + 64 * blk),
                                    _mm512_loadu_si512(xo + 64 * blk));
            __m512i a1 = int4_block(_mm512_loadu_si512(w + 64 * blk + 64),
                                    _mm512_loadu_si512(xe + 64 * blk + 64),
                                    _mm512_loadu_si512(xo + 64 * blk + 64));
            t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_permutexvar_ps(lanes, f), t0);
            lanes = _mm512_add_epi32(lanes, per_block);
            t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_permutexvar_ps(lanes, f), t1);
            lanes = _mm512_add_epi32(lanes, per_block);
        }
        for (; blk < stop; blk++) { /* an odd one, or the last block, maybe partial */
            long bytes = n - 128 * blk >= 128 ? 64 : (n - 128 * blk) / 2;
            __mmask64 m = bytes == 64 ? ~0ULL : (1ULL << bytes) - 1;
            __m512i a = int4_block(_mm512_maskz_loadu_epi8(m, w + 64 * blk),
                                   _mm512_maskz_loadu_epi8(m, xe + 64 * blk),
                                   _mm512_maskz_loadu_epi8(m, xo + 64 * blk));
            t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(lanes, f), t0);
            lanes = _mm512_add_epi32(lanes, per_block);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(t0, t1), fixed));
}
#endif

#if defined(__AVX512VNNI__)
/* int8 weights x int8 activations (quantized per group of 128). VNNI multiplies unsigned by
 * signed bytes, so the weights' sign bits are flipped (w + 128) and 128 * sum(xq) is taken
 * off afterwards (`shift`, the same for every row). */
static float dot_int8_vnni(const int8_t *w, const int8_t *xq, const float *xs, long n) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 total = _mm512_setzero_ps();
    for (long g = 0; g * 128 < n; g++) { /* a last group of fewer than 128 is masked */
        const int8_t *wg = w + g * 128, *xg = xq + g * 128;
        long r = n - g * 128;
        __mmask64 m0 = r >= 64 ? ~0ULL : (1ULL << r) - 1;
        __mmask64 m1 = r >= 128 ? ~0ULL : r > 64 ? (1ULL << (r - 64)) - 1 : 0;
        __m512i acc = _mm512_dpbusd_epi32(
            _mm512_setzero_si512(), _mm512_xor_si512(_mm512_maskz_loadu_epi8(m0, wg), flip),
            _mm512_maskz_loadu_epi8(m0, xg));
        acc = _mm512_dpbusd_epi32(
            acc, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m1, wg + 64), flip),
            _mm512_maskz_loadu_epi8(m1, xg + 64));
        total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs[g]), total);
    }
    return _mm512_reduce_add_ps(total);
}
#endif

/* Row `w` of an int4 matrix back to fp32 in `out` (for products of several tokens, which
 * take the weights a tile at a time): (q - 8) * scale + zero, 32 columns at a time (a group
 * holds 32 or more). */
static void dequantize_int4_row(const uint8_t *w, const uint16_t *sz, float *out, long n,
                                long group) {
    long c = 0;
#if defined(__AVX512F__)
    const __m512i low4 = _mm512_set1_epi32(15);
    const __m512 eight = _mm512_set1_ps(8.f);
    /* columns 2i and 2i+1 are the low and high nibbles of byte i */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (; c + 32 <= n; c += 32) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + c / 2)));
        __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low4)), eight);
        __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), eight);
        __m512 s = _mm512_set1_ps(bf16_to_f32(sz[2 * (c / group)]));
        __m512 z = _mm512_set1_ps(bf16_to_f32(sz[2 * (c / group) + 1]));
        _mm512_storeu_ps(out + c, _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, first, hi), s, z));
        _mm512_storeu_ps(out + c + 16,
                         _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, second, hi), s, z));
    }
#endif
    for (; c < n; c++) {
        float q = (float)((w[c / 2] >> (4 * (c & 1))) & 15) - 8.f;
        out[c] = q * bf16_to_f32(sz[2 * (c / group)]) + bf16_to_f32(sz[2 * (c / group) + 1]);
    }
}

/* Row r of a bf16, fp32 or fp8 matrix times vector b of x (bf16 for bf16 and fp8 rows). */
static inline float dot_float(int kind, const void *w, const void *x, long r, long b, long n) {
    if (kind == 0) return dot_bf16((const uint16_t *)w + r * n, (const uint16_t *)x + b * n, n);
    if (kind == 1) return dot_f32((const float *)w + r * n, (const float *)x + b * n, n);
    return dot_fp8((const uint8_t *)w + r * n, (const uint16_t *)x + b * n, n);
}

static void *run(void *arg) {
    job_t *j = arg;
    for (;;) {
        const long step = j->chunk ? j->chunk : CHUNK;
        long r0 = __atomic_fetch_add(&j->next, step, __ATOMIC_RELAXED);
        if (r0 >= j->rows) return NULL;
        long r1 = r0 + step < j->rows ? r0 + step : j->rows;
        for (long r = r0; r < r1; r++) {
            if (j->each)
                j->each(j->ctx, r);
            else if (j->kind <= 2) /* the row stays in L1 for the batch's other vectors */
                for (long b = 0; b < j->batch; b++)
                    j->out[b * j->rows + r] = dot_float(j->kind, j->w, j->x, r, b, j->cols);
#if defined(__AVX512VNNI__)
            else if (j->kind == 4) {
                const long groups = (j->cols + 127) / 128;
                for (long b = 0; b < j->batch; b++) {
                    const float *xs = j->xs + b * (groups + 1);
                    j->out[b * j->rows + r] =
                        j->row_scale[r] * (dot_int8_vnni((const int8_t *)j->w + r * j->cols,
                                                         j->xq + b * j->cols, xs, j->cols) -
                                           xs[groups]);
                }
            }
#endif
            else if (j->kind == 5)
                dequantize_int4_row((const uint8_t *)j->w + r * (j->cols / 2),
                                    j->sz + r * (j->cols / j->group) * 2, j->out + r * j->cols,
                                    j->cols, j->group);
            else {
                const uint8_t *w = (const uint8_t *)j->w + r * (j->cols / 2);
                const long groups = j->cols / j->group;
                const uint16_t *sz = j->sz + r * groups * 2;
                for (long b = 0; b < j->batch; b++) {
                    const float *xsum = j->xsum + b * 3 * groups;
                    float *out = j->out + b * j->rows + r;
#if defined(__AVX512VNNI__)
                    if (j->xq != NULL) {
                        *out = dot_int4_vnni(w, j->xq + b * j->cols, xsum + groups,
                                             xsum + 2 * groups, sz, xsum, j->cols, j->group);
                        continue;
                    }
#endif
                    *out = dot_int4(w, (const uint16_t *)j->x + b * j->cols, sz, xsum, j->cols,
                                    j->group);
                }
            }
        }
    }
}

/* 1 if this build has the vector path for `kind`, else 0 (the scalar loop is too slow). */
int gemv_vectorized(int kind) {
#if defined(__AVX512BF16__)
    if (kind == 0 || kind == 2 || kind == 3) return 1;
#endif
#if defined(__AVX512VNNI__)
    if (kind == 4) return 1;
#endif
#if defined(__AVX512F__)
    if (kind == 1) return 1;
#endif
    return 0;
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
            __builtin_ia32_pause();
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
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_pool); }

static void forget_pool(void) { /* in a forked child, which has none of the workers */
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pool_started = pool_busy = 0;
}

static void run_threads(job_t *job, int threads) {
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
        }
        pthread_t tid;
        pool_first_serial[pool_started] = pool_serial;
        if (pthread_create(&tid, NULL, worker, (void *)(long)pool_started) != 0) break;
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
    while (__atomic_load_n(&pool_busy, __ATOMIC_ACQUIRE) > 0) __builtin_ia32_pause();
    pthread_mutex_unlock(&call_lock);
}

#if defined(__AVX512F__)
/* ---- fp32 products of many vectors by short rows ---------------------------------------
 * Sixteen or more vectors times a short row (a small model's LM head: [16, 64] x [64, 131072])
 * are bound by the multiply-adds, and a dot product per (row, vector) spends as much again
 * summing its 16 lanes. Here the lanes are 16 vectors instead: x is transposed once, each
 * weight is broadcast against 16 vectors' elements, and each tile of 16 rows x 16 vectors
 * is transposed once at the end. */
typedef struct {
    const float *w, *xt; /* xt [cols, lanes]: x transposed, lanes = batch rounded up to 16 */
    float *out;
    long rows, cols, batch, lanes;
    int stream; /* out is too large for the caches */
} tiles_t;

/* r[i] = row i of a 16 x 16 block becomes r[j] = column j. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) { /* 128-bit lane L: rows i, i+1 at columns 4L..4L+3 */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + c], lane L: column 4L + c of rows i..i+3 */
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) { /* a 4 x 4 transpose of 128-bit lanes */
        const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        const __m512 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        t[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    memcpy(r, t, sizeof(t));
}

static void tile16(const void *arg, long tile) {
    const tiles_t *t = arg;
    const long r0 = tile * 16, n = t->rows - r0 < 16 ? t->rows - r0 : 16, cols = t->cols;
    const float *w[16];
    for (int i = 0; i < 16; i++) /* a last, partial tile repeats its last row */
        w[i] = t->w + (r0 + (i < n ? i : n - 1)) * cols;
    for (long b0 = 0; b0 < t->batch; b0 += 16) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (long k = 0; k < cols; k++) {
            const __m512 xv = _mm512_loadu_ps(t->xt + k * t->lanes + b0);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(w[i][k]), xv, acc[i]);
        }
        transpose16(acc); /* acc[j]: vector b0 + j's products with rows r0..r0+15 */
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        for (long j = 0; j < 16 && b0 + j < t->batch; j++) {
            float *out = t->out + (b0 + j) * t->rows + r0;
            /* Past the caches' reach, whole lines go straight to memory: with a power-of-two
             * row count every vector's line of a tile falls in one cache set, and 16 of them
             * evict each other (measured 2-4x slower). */
            if (t->stream && n == 16 && ((uintptr_t)out & 63) == 0)
                _mm512_stream_ps(out, acc[j]);
            else
                _mm512_mask_storeu_ps(out, m, acc[j]);
        }
    }
    if (t->stream) _mm_sfence();
}

/* From this many vectors on, the tiles beat a dot product per (row, vector). */
enum { TILE_BATCH = 8, STREAM_OUTPUT = 1 << 19 };
#endif

/* out [batch, rows] = x [batch, cols] @ w^T for bf16, fp32 or fp8 w (x bf16 for bf16 and
 * fp8). A few vectors at a time still read the weights once: torch's fp32 product of a few
 * rows by a wide matrix is up to 6x slower than that. */
void gemv(const void *w, const void *x, float *out, long rows, long cols, long batch, int kind,
          int threads) {
    threads = threads < 1 ? 1 : threads;
#if defined(__AVX512F__)
    if (kind == 1 && batch >= TILE_BATCH) {
        const long lanes = (batch + 15) / 16 * 16;
        float *xt = calloc(cols * lanes, sizeof(float));
        for (long b = 0; b < batch; b++)
            for (long k = 0; k < cols; k++) xt[k * lanes + b] = ((const float *)x)[b * cols + k];
        tiles_t t = {w, xt, out, rows, cols, batch, lanes, rows * batch >= STREAM_OUTPUT};
        job_t job = {0};
        job.rows = (rows + 15) / 16;
        job.each = tile16;
        job.ctx = &t;
        /* about eight claims per thread: each claim is a trip of the counter's cache line
         * between the cores */
        job.chunk = job.rows / (8L * threads);
        job.chunk = job.chunk < 1 ? 1 : job.chunk > 64 ? 64 : job.chunk;
        run_threads(&job, threads);
        free(xt);
        return;
    }
#endif
    job_t job = {w, x, out, rows, cols, kind, 0, NULL, NULL, 1, NULL, NULL, NULL, batch};
    run_threads(&job, threads);
}

/* out [rows, cols] = the int4 weights in fp32 (as Int4Linear stores them). */
void dequantize_int4(const uint8_t *w, const uint16_t *sz, float *out, long rows, long cols,
                     long group, int threads) {
    job_t job = {w, NULL, out, rows, cols, 5, 0, sz, NULL, group, NULL, NULL, NULL, 1};
    run_threads(&job, threads);
}

/* The index of each row's largest value, the first of equals; a NaN counts as largest (as
 * in numpy). A step's logits come straight from the LM head's streamed stores, out of the
 * caches: two threads read them about twice as fast as one. */
typedef struct {
    const float *x;
    long cols;
    long *out;
} argmax_t;

static void argmax_row(const void *arg, long row) {
    const argmax_t *a = arg;
    const float *x = a->x + row * a->cols;
    const long n = a->cols;
    long i = 0, best_i = 0;
    float best = x[0];
    if (best != best) {
        a->out[row] = 0;
        return;
    }
#if defined(__AVX512F__)
    if (n >= 16 && n < (1L << 31)) { /* (indices in 32-bit lanes) */
        __m512 top = _mm512_loadu_ps(x);
        __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i lane = at;
        for (i = 16; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break; /* the scalar loop finds it */
            const __mmask16 more = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
            top = _mm512_mask_mov_ps(top, more, v);
            at = _mm512_mask_mov_epi32(at, more, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i)));
        }
        if (_mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q) == 0) { /* first lanes' NaN: scalar */
            best = _mm512_reduce_max_ps(top);
            const __mmask16 tied = _mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_EQ_OQ);
            best_i = _mm512_mask_reduce_min_epi32(tied, at);
        } else
            i = 0;
    }
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) {
            best_i = i;
            break;
        }
        if (x[i] > best || (x[i] == best && i < best_i)) {
            best = x[i];
            best_i = i;
        }
    }
    a->out[row] = best_i;
}

void argmax_rows(const float *x, long rows, long cols, long *out, int threads) {
    argmax_t a = {x, cols, out};
    job_t job = {0};
    job.rows = rows;
    job.each = argmax_row;
    job.ctx = &a;
    job.chunk = 1;
    run_threads(&job, threads);
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* out [batch, rows] = int4 weights @ x [batch, cols]: each weight row is read once for all
 * the vectors (it stays in L1 for the others). On VNNI machines x is quantized to int8 per
 * group (as llama.cpp does); otherwise the products are in bf16. */
void gemv_int4(const uint8_t *w, const float *x, const uint16_t *sz, float *out, long rows,
               long cols, long group, long batch, int threads) {
    const long groups = cols / group;
    float *xsum = malloc(sizeof(float) * 3 * groups * batch);
    int8_t *xq = NULL;
    uint16_t *xb = NULL;
#if defined(__AVX512VNNI__)
    xq = malloc(cols * batch);
#else
    xb = malloc(sizeof(uint16_t) * cols * batch);
#endif
    for (long b = 0; b < batch; b++) {
        const float *xv = x + b * cols;
        float *sums = xsum + b * 3 * groups, *xs = sums + groups; /* then 8 xs sum(xq) */
        for (long g = 0; g < groups; g++) {
            float sum = 0.f, amax = 0.f;
            for (long c = g * group; c < (g + 1) * group; c++) {
                sum += xv[c];
                amax = fabsf(xv[c]) > amax ? fabsf(xv[c]) : amax;
            }
            sums[g] = sum;
            xs[g] = amax > 0.f ? amax / 127.f : 1.f;
        }
#if defined(__AVX512VNNI__)
        int8_t *q = xq + b * cols;
        for (long g = 0; g < groups; g++) {
            float inv = 1.f / xs[g], sum = 0.f;
            for (long c = g * group; c < (g + 1) * group; c++) {
                float v = nearbyintf(xv[c] * inv);
                v = v > 127.f ? 127.f : v < -127.f ? -127.f : v;
                q[(c & 1) * (cols / 2) + c / 2] = (int8_t)v;
                sum += v;
            }
            xs[groups + g] = 8.f * xs[g] * sum;
        }
#else
        for (long c = 0; c < cols; c++) xb[b * cols + c] = f32_to_bf16(xv[c]);
#endif
    }
    job_t job = {w, xb, out, rows, cols, 3, 0, sz, xsum, group, xq, NULL, NULL, batch};
    run_threads(&job, threads);
    free(xb);
    free(xq);
    free(xsum);
}

#if defined(__AVX512VNNI__)
/* out [batch, rows] = row_scale * (int8 weights @ x [batch, cols] (fp32)): x is quantized to
 * int8 per group of 128 columns (about 0.4% error, as llama.cpp's CPU dot products do); each
 * weight row is read once for all the vectors. */
void gemv_int8(const int8_t *w, const float *x, const float *row_scale, float *out,
               long rows, long cols, long batch, int threads) {
    const long groups = (cols + 127) / 128;
    float *xs_all = malloc(sizeof(float) * (groups + 1) * batch);
    int8_t *xq = malloc(cols * batch);
    for (long b = 0; b < batch; b++) {
        const float *xv = x + b * cols;
        float *xs = xs_all + b * (groups + 1), shift = 0.f;
        int8_t *q = xq + b * cols;
        for (long g = 0; g < groups; g++) {
            long end = (g + 1) * 128 < cols ? (g + 1) * 128 : cols;
            float amax = 0.f;
            for (long c = g * 128; c < end; c++)
                amax = fabsf(xv[c]) > amax ? fabsf(xv[c]) : amax;
            xs[g] = amax > 0.f ? amax / 127.f : 1.f;
            long sum = 0;
            for (long c = g * 128; c < end; c++) {
                float v = nearbyintf(xv[c] / xs[g]);
                q[c] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
                sum += q[c];
            }
            shift += 128.f * xs[g] * (float)sum;
        }
        xs[groups] = shift;
    }
    job_t job = {w, x, out, rows, cols, 4, 0, NULL, NULL, 128, xq, xs_all, row_scale, batch};
    run_threads(&job, threads);
    free(xq);
    free(xs_all);
}
#endif

/* Attention of one new token, all in fp32 (one sequence): out[h] = softmax(q_h . K^T /
 * sqrt(hd)) V over positions 0..n-1, with the K and V of KV head h / (heads / kv). Position p
 * of KV head g lives at element offs[p] + g * head_stride of a cache: so one function serves
 * the contiguous cache [kv, max_len, hd] and the paged pool [slots, kv, hd].
 *
 * The work is split by KV head and by spans of positions (as in flash-decoding), so that
 * each K and V row is read once for all the query heads that share it, and a long context
 * keeps every thread busy. Each span leaves, per query head, its unnormalized output, its
 * highest score and its sum of exponentials; the spans are then merged. */
typedef struct {
    const float *q, *kc, *vc;
    const long *offs;
    long head_stride, n, span, spans;
    int heads, kv, hd;
    float *scores; /* [kv * spans, heads / kv, span] */
    float *part;   /* [kv * spans, heads / kv, hd + 2]: output, highest score, sum */
} attention_t;

/* The attention of every sequence of a step as one list of jobs: sequence i's are jobs
 * first[i] .. first[i + 1] - 1. */
typedef struct {
    const attention_t *seqs;
    const long *first;
    long n;
} attentions_t;

#if defined(__AVX512F__)
/* e^x for x in [-87, 88]: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its
 * Taylor polynomial of degree 6 (relative error ~1e-7, about glibc's expf). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2, split */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* x[i] = e^(x[i] - shift); returns their sum. */
static float exp_shifted(float *x, long n, float shift) {
    long i = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(shift)));
        _mm512_mask_storeu_ps(x + i, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; i < n; i++) total += x[i] = expf(x[i] - shift);
    return total;
}

#if defined(__AVX512F__)
/* The sums of r[0..15]'s lanes, in order: a transpose that adds as it goes (15 merges of
 * two vectors, against 16 horizontal sums of four steps each). */
static inline __m512 sum16(const __m512 r[16]) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; i++) /* lane L: r[2i], r[2i+1] at two pairs of L's columns */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                             _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* lane L: rows 4i..4i+3, each summed over lane L */
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88),
                         _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}
#endif

static void attend_span(const attention_t *a, long job) {
    const int group = a->heads / a->kv, hd = a->hd;
    const long g = job / a->spans, p0 = (job % a->spans) * a->span;
    const long len = a->n - p0 < a->span ? a->n - p0 : a->span, head = g * a->head_stride;
    const float *kc = a->kc + head, *vc = a->vc + head, scale = 1.f / sqrtf((float)hd);
    const float *q = a->q + (long)g * group * hd;
    float *scores = a->scores + job * group * a->span;
    long p = 0;
    /* Ask for the span's keys and values at once: in a serving step they were pushed out of
     * the caches by the previous LM head, and blocks of the cache are scattered, so the
     * hardware's prefetcher loses the thread at each one (measured: 1.1 -> 0.85 ms for the
     * step of 16 tiny-model sequences of ~500 positions after an LM head). */
    for (long i = 0; i < len; i++)
        for (int d = 0; d < hd; d += 16) {
            __builtin_prefetch(kc + a->offs[p0 + i] + d, 0, 2);
            __builtin_prefetch(vc + a->offs[p0 + i] + d, 0, 2);
        }
#if defined(__AVX512F__)
    /* 16 positions at a time: their keys (from L1) against each query head, 16 scores per
     * sum16 */
    for (; hd % 16 == 0 && p < len; p += 16) {
        const float *k[16];
        for (int i = 0; i < 16; i++) /* a last, partial block repeats its last position */
            k[i] = kc + a->offs[p0 + (p + i < len ? p + i : len - 1)];
        const __mmask16 m = len - p >= 16 ? 0xFFFF : (__mmask16)((1u << (len - p)) - 1);
        for (int j = 0; j < group; j++) {
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int d = 0; d < hd; d += 16) {
                const __m512 qv = _mm512_loadu_ps(q + (long)j * hd + d);
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(k[i] + d), qv, acc[i]);
            }
            _mm512_mask_storeu_ps(scores + j * a->span + p, m,
                                  _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
        }
    }
#endif
    for (; p < len; p++)
        for (int j = 0; j < group; j++)
            scores[j * a->span + p] = dot_f32(kc + a->offs[p0 + p], q + (long)j * hd, hd) * scale;
    for (int j = 0; j < group; j++) {
        float *s = scores + j * a->span, *out = a->part + (job * group + j) * (hd + 2), top = s[0];
        for (long p = 1; p < len; p++) top = s[p] > top ? s[p] : top;
        out[hd] = top;
        out[hd + 1] = exp_shifted(s, len, top);
        int d = 0;
#if defined(__AVX512F__)
        /* 16 output dims at a time over the span: one cache line of each V row per pass,
         * four positions at a time on four sums (one sum waits out each multiply-add) */
        for (; d + 16 <= hd; d += 16) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            long p = 0;
            for (; p + 4 <= len; p += 4)
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(s[p + u]),
                                             _mm512_loadu_ps(vc + a->offs[p0 + p + u] + d), acc[u]);
            for (; p < len; p++)
                acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(s[p]),
                                         _mm512_loadu_ps(vc + a->offs[p0 + p] + d), acc[0]);
            _mm512_storeu_ps(out + d, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                    _mm512_add_ps(acc[2], acc[3])));
        }
#endif
        for (; d < hd; d++) {
            float acc = 0.f;
            for (long p = 0; p < len; p++) acc += s[p] * vc[a->offs[p0 + p] + d];
            out[d] = acc;
        }
    }
}

static void attend_job(const void *arg, long job) {
    const attentions_t *all = arg;
    long i = 0;
    while (job >= all->first[i + 1]) i++;
    attend_span(&all->seqs[i], job - all->first[i]);
}

/* Below this many multiply-adds in all, attention stays on the calling thread; spans are at
 * least SPAN positions. */
enum { PARALLEL_ATTENTION = 1 << 16, SPAN = 128 };

/* How sequence `a` (its n, heads, kv and hd set) splits into spans: about four jobs per
 * thread, of SPAN positions or more. Returns the floats of scratch its jobs need. */
static long plan_spans(attention_t *a, int threads) {
    long spans = (4L * threads + a->kv - 1) / a->kv, most = (a->n + SPAN - 1) / SPAN;
    spans = spans < most ? spans : most;
    a->span = (a->n + spans - 1) / spans;
    a->spans = (a->n + a->span - 1) / a->span;
    return (long)a->heads * a->spans * (a->span + a->hd + 2);
}

/* RoPE on q [heads, hd] and k [kv, hd] in place (interleaved pairs; `rot` holds cos, sin
 * for each pair), then k and v stored at slot offset `off` of the caches. */
static void rope_and_store(float *q, float *k, const float *v, float *kc, float *vc, long off,
                           long head_stride, int heads, int kv, int hd, const float *rot) {
    for (int h = 0; h < heads + kv; h++) {
        float *x = h < heads ? q + (long)h * hd : k + (long)(h - heads) * hd;
        for (int i = 0; i < hd / 2; i++) {
            float a = x[2 * i], b = x[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
            x[2 * i] = a * c - b * s;
            x[2 * i + 1] = a * s + b * c;
        }
    }
    for (int g = 0; g < kv; g++) {
        memcpy(kc + off + g * head_stride, k + (long)g * hd, sizeof(float) * hd);
        memcpy(vc + off + g * head_stride, v + (long)g * hd, sizeof(float) * hd);
    }
}

/* out[h] for each sequence's query head h: its spans' outputs merged. */
static void merge_spans(const attention_t *a, float *out) {
    const int group = a->heads / a->kv, hd = a->hd;
    for (int h = 0; h < a->heads; h++) {
        const float *first = a->part + ((long)(h / group) * a->spans * group + h % group) * (hd + 2);
        const long stride = (long)group * (hd + 2); /* from one span to the next */
        float top = -INFINITY, total = 0.f, *o = out + (long)h * hd;
        for (long s = 0; s < a->spans; s++)
            top = first[s * stride + hd] > top ? first[s * stride + hd] : top;
        memset(o, 0, sizeof(float) * hd);
        for (long s = 0; s < a->spans; s++) {
            const float *ps = first + s * stride, w = expf(ps[hd] - top);
            total += w * ps[hd + 1];
            for (int d = 0; d < hd; d++) o[d] += w * ps[d];
        }
        for (int d = 0; d < hd; d++) o[d] /= total;
    }
}

/* ---- A whole decode step of one sequence: every layer of one token in one call ---------
 * Decoding SmolLM2-sized models, the products take about half of a token's time; the rest
 * was some forty small torch ops per layer (norms, residuals, SiLU, views) and the Python
 * around them. Here they are loops over a few thousand floats. */

enum { KIND_BF16 = 0, KIND_FP32 = 1, KIND_FP8 = 2, KIND_INT4 = 3, KIND_INT8 = 4 };

typedef struct {
    int kind;
    long rows, cols, group; /* group: int4's group size */
    const void *w;
    const void *scale;      /* int4: (scale, zero) bf16 [rows, groups, 2]; int8: fp32 [rows];
                               fp8: fp32, one per row or one for all; bf16, fp32: none */
    long scales;            /* fp8: how many scales (1 or rows) */
} linear_t;

/* out [batch, rows] = x [batch, cols] @ W^T for x in fp32, as the layer's own Python
 * forward computes it; `xb` has room for batch * cols bf16 values (bf16 and fp8 weights take
 * x in bf16; the int kernels quantize each row of x on its own). */
static void linear(const linear_t *l, const float *x, float *out, long batch, uint16_t *xb,
                   int threads) {
    const long rows = l->rows, cols = l->cols;
    if (l->kind == KIND_INT4) {
        gemv_int4(l->w, x, l->scale, out, rows, cols, l->group, batch, threads);
        return;
    }
#if defined(__AVX512VNNI__)
    if (l->kind == KIND_INT8) {
        gemv_int8(l->w, x, l->scale, out, rows, cols, batch, threads);
        return;
    }
#endif
    if (l->kind == KIND_FP32) {
        gemv(l->w, x, out, rows, cols, batch, KIND_FP32, threads);
        return;
    }
    for (long c = 0; c < batch * cols; c++) xb[c] = f32_to_bf16(x[c]);
    gemv(l->w, xb, out, rows, cols, batch, l->kind, threads);
    if (l->kind == KIND_FP8) {
        const float *s = l->scale;
        for (long r = 0; r < batch * rows; r++) out[r] *= s[l->scales > 1 ? r % rows : 0];
    }
}

/* Layers ls[0..n) applied to the same x, their outputs one after another, each [batch,
 * rows]; `stacked` finds element e of sequence b's concatenated output there. */
static void linears(const linear_t *ls, int n, const float *x, float *out, long batch,
                    uint16_t *xb, int threads) {
    for (int j = 0; j < n; out += batch * ls[j].rows, j++)
        linear(&ls[j], x, out, batch, xb, threads);
}

static float *stacked(float *out, const linear_t *ls, int n, long batch, long b, long e) {
    int j = 0;
    for (; j < n - 1 && e >= ls[j].rows; j++) {
        out += batch * ls[j].rows;
        e -= ls[j].rows;
    }
    return out + b * ls[j].rows + e;
}

typedef struct {
    const float *attention_norm, *ffn_norm;
    linear_t qkv[3], wo, gate_up[2], w2; /* q, k, v and gate, up: one fused layer or each */
    int n_qkv, n_gate_up;
} layer_t;

typedef struct {
    int n_layers, dim, hidden, heads, kv, hd;
    float eps;
    const layer_t *layers;
    const float *norm;      /* the final RMSNorm's weight */
} decoder_t;

typedef struct {            /* where layer 0's keys and values are (see attention_t) */
    float *k, *v;
    long layer_stride, slot_stride, head_stride;
    const long *blocks;     /* a paged cache's block table: position p is in slot
                               blocks[p / block_size] * block_size + p % block_size; or NULL:
                               slot p */
    long block_size;
} kv_layout_t;

/* gate[i] = SiLU(gate[i]) * up[i] */
static void silu_times(float *gate, const float *up, long n) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f),
                                   _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(gate + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

static void rms_norm(const float *x, const float *weight, float *out, long n, float eps) {
    const float inv = 1.f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* x [batch, dim]: each sequence's new token's embedding in, the final norm's output out
 * (the LM head is left to the caller). Sequence b's keys and values of position pos[b] are
 * stored where c[b] says; rot[b] (hd floats) is RoPE at pos[b]. */
void decode_step(const decoder_t *m, long batch, const kv_layout_t *c, const long *pos,
                 const float *rot, float *x, int threads) {
    threads = threads < 1 ? 1 : threads;
    const long dim = m->dim, hidden = m->hidden, hd = m->hd, q_size = (long)m->heads * hd;
    const long kv_size = (long)m->kv * hd;
    const long widest = hidden > q_size ? (hidden > dim ? hidden : dim) : (q_size > dim ? q_size : dim);
    /* Every sequence's attention, planned once for all layers: its spans, its slot offsets
     * of its positions, and its jobs' place in one list (so that many short sequences still
     * make one call to the threads). */
    attention_t *att_seq = calloc(batch, sizeof(attention_t));
    long *first = malloc(sizeof(long) * (batch + 1)), offs_total = 0, scratch_total = 0, work = 0;
    for (long b = 0; b < batch; b++) work += (pos[b] + 1) * q_size;
    const int att_threads = work < PARALLEL_ATTENTION ? 1 : threads;
    first[0] = 0;
    for (long b = 0; b < batch; b++) {
        attention_t *a = &att_seq[b];
        a->n = pos[b] + 1;
        a->heads = m->heads, a->kv = m->kv, a->hd = m->hd;
        a->head_stride = c[b].head_stride;
        scratch_total += plan_spans(a, att_threads);
        first[b + 1] = first[b] + a->kv * a->spans;
        offs_total += a->n;
    }
    float *h = malloc(sizeof(float) * (batch * (dim + q_size + 2 * kv_size + q_size + dim +
                                                3 * hidden) + scratch_total));
    float *qkv = h + batch * dim, *att = qkv + batch * (q_size + 2 * kv_size);
    float *o = att + batch * q_size, *gate_up = o + batch * dim;
    float *gate = gate_up + batch * 2 * hidden; /* [batch, hidden]: SiLU(gate) * up */
    uint16_t *xb = malloc(sizeof(uint16_t) * batch * widest);
    long *offs = malloc(sizeof(long) * offs_total);
    for (long b = 0, at = 0, sc = 0; b < batch; at += att_seq[b].n, b++) {
        attention_t *a = &att_seq[b];
        const long bs = c[b].block_size;
        long *seq_offs = offs + at;
        for (long p = 0; p < a->n; p++)
            seq_offs[p] = (c[b].blocks ? c[b].blocks[p / bs] * bs + p % bs : p) * c[b].slot_stride;
        a->offs = seq_offs;
        a->scores = gate + batch * hidden + sc;
        a->part = a->scores + (long)a->heads * a->spans * a->span;
        sc += (long)a->heads * a->spans * (a->span + a->hd + 2);
    }
    const attentions_t all = {att_seq, first, batch};
    job_t att_job = {0};
    att_job.rows = first[batch];
    att_job.each = attend_job;
    att_job.ctx = &all;
    att_job.chunk = 1;
    for (int i = 0; i < m->n_layers; i++) {
        const layer_t *l = &m->layers[i];
        for (long b = 0; b < batch; b++)
            rms_norm(x + b * dim, l->attention_norm, h + b * dim, dim, m->eps);
        linears(l->qkv, l->n_qkv, h, qkv, batch, xb, threads);
        for (long b = 0; b < batch; b++) {
            attention_t *a = &att_seq[b];
            const long layer = i * c[b].layer_stride;
            float *q = stacked(qkv, l->qkv, l->n_qkv, batch, b, 0);
            a->q = q, a->kc = c[b].k + layer, a->vc = c[b].v + layer;
            rope_and_store(q, stacked(qkv, l->qkv, l->n_qkv, batch, b, q_size),
                           stacked(qkv, l->qkv, l->n_qkv, batch, b, q_size + kv_size),
                           c[b].k + layer, c[b].v + layer, a->offs[pos[b]], a->head_stride,
                           m->heads, m->kv, m->hd, rot + b * hd);
        }
        att_job.next = 0;
        run_threads(&att_job, att_threads);
        for (long b = 0; b < batch; b++) merge_spans(&att_seq[b], att + b * q_size);
        linear(&l->wo, att, o, batch, xb, threads);
        for (long d = 0; d < batch * dim; d++) x[d] += o[d];
        for (long b = 0; b < batch; b++)
            rms_norm(x + b * dim, l->ffn_norm, h + b * dim, dim, m->eps);
        linears(l->gate_up, l->n_gate_up, h, gate_up, batch, xb, threads);
        for (long b = 0; b < batch; b++) {
            memcpy(gate + b * hidden, stacked(gate_up, l->gate_up, l->n_gate_up, batch, b, 0),
                   sizeof(float) * hidden);
            silu_times(gate + b * hidden,
                       stacked(gate_up, l->gate_up, l->n_gate_up, batch, b, hidden), hidden);
        }
        linear(&l->w2, gate, o, batch, xb, threads);
        for (long d = 0; d < batch * dim; d++) x[d] += o[d];
    }
    for (long b = 0; b < batch; b++) rms_norm(x + b * dim, m->norm, h + b * dim, dim, m->eps);
    memcpy(x, h, sizeof(float) * batch * dim);
    free(att_seq);
    free(first);
    free(offs);
    free(xb);
    free(h);
}
