/* Products by int4 and int8 weights (each weight row read once for all of up to a few dozen
 * vectors), and int4 weights back to fp32. */
#include <math.h>

#include "kernels.h"


/* One row of an int4 matrix: `w` holds cols/2 bytes (value 2i in the low nibble of byte i),
 * `sz` the row's (scale, zero) fp16 pairs, one per group of `group` columns, so that
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
        total = _mm512_fmadd_ps(acc, _mm512_set1_ps(f16_to_f32(sz[2 * g])), total);
    }
    out = _mm512_reduce_add_ps(total);
#else
    for (long g = 0; g < groups; g++) {
        float q = 0.f;
        for (long c = g * group; c < (g + 1) * group; c++)
            q += (float)((w[c / 2] >> (4 * (c & 1))) & 15) * bf16_to_f32(x[c]);
        out += f16_to_f32(sz[2 * g]) * q;
    }
#endif
    for (long g = 0; g < groups; g++)
        out += (f16_to_f32(sz[2 * g + 1]) - 8.f * f16_to_f32(sz[2 * g])) * xsum[g];
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
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_group = _mm512_srli_epi32(_mm512_slli_epi32(iota, 3), __builtin_ctzl(group));
    const __m512i per_block = _mm512_set1_epi32((int)(128 / group));
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, fixed = t0;
    for (long g = 0, blk = 0; g < groups; g += 16) {
        __mmask16 gm = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        /* the groups' (scale, zero) fp16 pairs as 32-bit words: the scale is the low half */
        __m512i pairs = _mm512_maskz_loadu_epi32(gm, sz + 2 * g);
        __m512 scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pairs));
        __m512 zero = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
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

#if defined(MISTRAL_NEMO_AVX2)
/* The int32 sums of 32 byte products, 4 per lane: maddubs multiplies unsigned by signed
 * bytes into pairs of int16, which must not saturate (here |a| <= 127 or a <= 15). */
static inline __m256i dot_bytes(__m256i a_unsigned, __m256i b_signed) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a_unsigned, b_signed), _mm256_set1_epi16(1));
}

/* int4 x int8 as `dot_int4_vnni` computes it, 64 columns (32 weight bytes) at a time: lane i
 * of the sums covers columns 8i..8i+7 of the 64, so with groups of 32 lanes 0-3 are one
 * group and 4-7 the next. */
static float dot_int4_avx2(const uint8_t *w, const int8_t *xq, const float *xs,
                           const float *xsq, const uint16_t *sz, const float *xsum, long n,
                           long group) {
    const long groups = n / group, bytes = n / 2;
    const int8_t *xe = xq, *xo = xq + bytes;
    const __m256i low4 = _mm256_set1_epi8(15);
    float fixed = 0.f, tail = 0.f;
    for (long g = 0; g < groups; g++) {
        const float scale = f16_to_f32(sz[2 * g]);
        fixed += f16_to_f32(sz[2 * g + 1]) * xsum[g] - scale * xsq[g];
    }
    __m256 total = _mm256_setzero_ps();
    long k = 0;
    for (; k + 32 <= bytes; k += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        const __m256i lo = _mm256_and_si256(wv, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
        const __m256i sums = _mm256_add_epi32(
            dot_bytes(lo, _mm256_loadu_si256((const __m256i *)(xe + k))),
            dot_bytes(hi, _mm256_loadu_si256((const __m256i *)(xo + k))));
        const long g = 2 * k / group, g1 = group == 32 ? g + 1 : g;
        const float f0 = f16_to_f32(sz[2 * g]) * xs[g], f1 = f16_to_f32(sz[2 * g1]) * xs[g1];
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_setr_ps(f0, f0, f0, f0, f1, f1, f1, f1),
                                total);
    }
    for (; k < bytes; k++) { /* a last 16 bytes (32 columns) */
        const long g = 2 * k / group;
        tail += (float)((w[k] & 15) * xe[k] + (w[k] >> 4) * xo[k]) * f16_to_f32(sz[2 * g]) * xs[g];
    }
    return sum8(total) + tail + fixed;
}

/* int8 x int8 per group of 128: |w| times x with w's sign, so maddubs sees an unsigned
 * operand and no flip of the weights is needed. */
static float dot_int8_avx2(const int8_t *w, const int8_t *xq, const float *xs, long n) {
    __m256 total = _mm256_setzero_ps();
    float tail = 0.f;
    for (long g = 0; g * 128 < n; g++) {
        const long end = (g + 1) * 128 < n ? (g + 1) * 128 : n;
        __m256i acc = _mm256_setzero_si256();
        long c = g * 128;
        for (; c + 32 <= end; c += 32) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + c));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c));
            acc = _mm256_add_epi32(acc, dot_bytes(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)));
        }
        long rest = 0;
        for (; c < end; c++) rest += (long)w[c] * xq[c];
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(xs[g]), total);
        tail += (float)rest * xs[g];
    }
    return sum8(total) + tail;
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
        __m512 s = _mm512_set1_ps(f16_to_f32(sz[2 * (c / group)]));
        __m512 z = _mm512_set1_ps(f16_to_f32(sz[2 * (c / group) + 1]));
        _mm512_storeu_ps(out + c, _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, first, hi), s, z));
        _mm512_storeu_ps(out + c + 16,
                         _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, second, hi), s, z));
    }
#endif
    for (; c < n; c++) {
        float q = (float)((w[c / 2] >> (4 * (c & 1))) & 15) - 8.f;
        out[c] = q * f16_to_f32(sz[2 * (c / group)]) + f16_to_f32(sz[2 * (c / group) + 1]);
    }
}

/* One int4 product's operands (or a dequantization's: w, sz, out, cols, group). */
typedef struct {
    const uint8_t *w;    /* [rows, cols / 2] */
    const uint16_t *x;   /* without VNNI: x in bf16 */
    const uint16_t *sz;  /* [rows, groups, 2] fp16 (scale, zero) */
    const float *xsum;   /* per vector: sum of x per group, then (VNNI) the scale of xq per
                            group, then 8 * scale * sum(xq) per group */
    const int8_t *xq;    /* VNNI, per vector: x quantized per group, even then odd columns */
    float *out;          /* [batch, rows] (a dequantization's: [rows, cols]) */
    long rows, cols, group, batch;
} int4_products_t;

static void int4_rows(const void *arg, long first, long end) {
    const int4_products_t *j = arg;
    for (long r = first; r < end; r++) {
        const uint8_t *w = j->w + r * (j->cols / 2);
        const long groups = j->cols / j->group;
        const uint16_t *sz = j->sz + r * groups * 2;
        for (long b = 0; b < j->batch; b++) {
            const float *xsum = j->xsum + b * 3 * groups;
            float *out = j->out + b * j->rows + r;
#if defined(__AVX512VNNI__)
            if (j->xq != NULL) {
                *out = dot_int4_vnni(w, j->xq + b * j->cols, xsum + groups, xsum + 2 * groups, sz,
                                     xsum, j->cols, j->group);
                continue;
            }
#elif defined(MISTRAL_NEMO_AVX2)
            *out = dot_int4_avx2(w, j->xq + b * j->cols, xsum + groups, xsum + 2 * groups, sz,
                                 xsum, j->cols, j->group);
            continue;
#endif
            *out = dot_int4(w, j->x + b * j->cols, sz, xsum, j->cols, j->group);
        }
    }
}

static void dequantize_rows(const void *arg, long first, long end) {
    const int4_products_t *j = arg;
    for (long r = first; r < end; r++)
        dequantize_int4_row(j->w + r * (j->cols / 2), j->sz + r * (j->cols / j->group) * 2,
                            j->out + r * j->cols, j->cols, j->group);
}

#if defined(MISTRAL_NEMO_INT8_DOT)
/* One int8 product's operands. */
typedef struct {
    const int8_t *w;        /* [rows, cols] */
    const int8_t *xq;       /* per vector: x quantized per group of 128, in order */
    const float *xs;        /* per vector: xq's scale per group, then 128 * the sum over
                               groups of scale * sum(xq) */
    const float *row_scale; /* per output row */
    float *out;             /* [batch, rows] */
    long rows, cols, batch;
} int8_products_t;

static void int8_rows(const void *arg, long first, long end) {
    const int8_products_t *j = arg;
    for (long r = first; r < end; r++) {
        const long groups = (j->cols + 127) / 128;
        for (long b = 0; b < j->batch; b++) {
            const float *xs = j->xs + b * (groups + 1);
#if defined(__AVX512VNNI__)
            const float dot = dot_int8_vnni(j->w + r * j->cols, j->xq + b * j->cols, xs, j->cols);
#else
            const float dot = dot_int8_avx2(j->w + r * j->cols, j->xq + b * j->cols, xs, j->cols);
#endif
            j->out[b * j->rows + r] = j->row_scale[r] * (dot - xs[groups]);
        }
    }
}
#endif

/* out [rows, cols] = the int4 weights in fp32 (as Int4Linear stores them). */
void dequantize_int4(const uint8_t *w, const uint16_t *sz, float *out, long rows, long cols,
                     long group, int threads) {
    const int4_products_t p = {.w = w, .sz = sz, .out = out, .cols = cols, .group = group};
    job_t job = {.rows = rows, .each = dequantize_rows, .ctx = &p};
    run_threads(&job, threads);
}

/* out [batch, rows] = int4 weights @ x [batch, cols]: each weight row is read once for all
 * the vectors (it stays in L1 for the others). On VNNI machines x is quantized to int8 per
 * group (as llama.cpp does); otherwise the products are in bf16. */
long gemv_int4(const uint8_t *w, const float *x, const uint16_t *sz, float *out, long rows,
               long cols, long group, long batch, int threads) {
    const long groups = cols / group;
    long failed = 0;
    float *xsum = scratch(3 * groups * batch, sizeof(float), 0, &failed);
    int8_t *xq = NULL;
    uint16_t *xb = NULL;
#if defined(MISTRAL_NEMO_INT8_DOT)
    xq = scratch(cols * batch, 1, 0, &failed);
#else
    xb = scratch(cols * batch, sizeof(uint16_t), 0, &failed);
#endif
    if (failed) goto done;
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
#if defined(MISTRAL_NEMO_INT8_DOT)
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
    const int4_products_t p = {w, xb, sz, xsum, xq, out, rows, cols, group, batch};
    job_t job = {.rows = rows, .each = int4_rows, .ctx = &p};
    run_threads(&job, threads);
done:
    free(xb);
    free(xq);
    free(xsum);
    return failed;
}

#if defined(MISTRAL_NEMO_INT8_DOT)
/* out [batch, rows] = row_scale * (int8 weights @ x [batch, cols] (fp32)): x is quantized to
 * int8 per group of 128 columns (about 0.4% error, as llama.cpp's CPU dot products do); each
 * weight row is read once for all the vectors. */
long gemv_int8(const int8_t *w, const float *x, const float *row_scale, float *out,
               long rows, long cols, long batch, int threads) {
    const long groups = (cols + 127) / 128;
    long failed = 0;
    float *xs_all = scratch((groups + 1) * batch, sizeof(float), 0, &failed);
    int8_t *xq = scratch(cols * batch, 1, 0, &failed);
    if (failed) goto done;
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
#if defined(__AVX512VNNI__)
            shift += 128.f * xs[g] * (float)sum; /* VNNI's weights are flipped: w + 128 */
#else
            (void)sum;
#endif
        }
        xs[groups] = shift;
    }
    const int8_products_t p = {w, xq, xs_all, row_scale, out, rows, cols, batch};
    job_t job = {.rows = rows, .each = int8_rows, .ctx = &p};
    run_threads(&job, threads);
done:
    free(xq);
    free(xs_all);
    return failed;
}
#endif
