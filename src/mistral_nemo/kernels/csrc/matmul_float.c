/* Products by bf16, fp32 and float8_e4m3fn weights: out[r] = dot(w[r, :], x) for one vector
 * x or a few dozen (each weight row read once for all of them), and fp32 products of many
 * vectors by short rows in tiles. */
#include "kernels.h"

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

#if defined(MISTRAL_NEMO_AVX2)
/* A bf16 or fp8 row times an fp32 vector: without AVX-512 BF16, x is widened once per call
 * (by `gemv`) rather than once per row, which doubled the work of a row (bf16: 1.0-1.7x
 * torch's speed, not 1.3-2x). Inlined with a constant `kind`. */
static inline float dot_widened(enum weight_kind kind, const void *w, const float *x, long n) {
    long c;
    float tail = dot8(w, x, n, kind, &c);
    for (; c < n; c++)
        tail += x[c] * (kind == KIND_BF16 ? bf16_to_f32(((const uint16_t *)w)[c])
                                          : fp8_to_f32(((const uint8_t *)w)[c]));
    return tail;
}
#endif

/* Row r of a bf16, fp32 or fp8 matrix times vector b of x (bf16 for bf16 and fp8 rows; fp32
 * for them on AVX2, widened by `gemv`). */
static inline float dot_float(enum weight_kind kind, const void *w, const void *x, long r, long b,
                              long n) {
#if defined(MISTRAL_NEMO_AVX2)
    if (kind == KIND_BF16)
        return dot_widened(KIND_BF16, (const uint16_t *)w + r * n, (const float *)x + b * n, n);
    if (kind == KIND_FP8)
        return dot_widened(KIND_FP8, (const uint8_t *)w + r * n, (const float *)x + b * n, n);
#endif
    if (kind == KIND_BF16)
        return dot_bf16((const uint16_t *)w + r * n, (const uint16_t *)x + b * n, n);
    if (kind == KIND_FP32) return dot_f32((const float *)w + r * n, (const float *)x + b * n, n);
    return dot_fp8((const uint8_t *)w + r * n, (const uint16_t *)x + b * n, n);
}

/* One product's operands: out [batch, rows] = x [batch, cols] @ w^T (x bf16 for bf16 and
 * fp8 rows, fp32 for fp32 rows). */
typedef struct {
    const void *w, *x;
    float *out;
    long rows, cols, batch;
    enum weight_kind kind;
} products_t;

static void product_rows(const void *arg, long first, long end) {
    const products_t *j = arg;
    for (long r = first; r < end; r++) /* the row stays in L1 for the batch's other vectors */
        for (long b = 0; b < j->batch; b++)
            j->out[b * j->rows + r] = dot_float(j->kind, j->w, j->x, r, b, j->cols);
}

int gemv_vectorized(enum weight_kind kind) {
#if defined(__AVX512BF16__)
    if (kind == KIND_BF16 || kind == KIND_FP8 || kind == KIND_INT4) return 1;
#endif
#if defined(__AVX512VNNI__)
    if (kind == KIND_INT8) return 1;
#endif
#if defined(__AVX512F__)
    if (kind == KIND_FP32) return 1;
#elif defined(MISTRAL_NEMO_AVX2)
    return 1; /* fp32, bf16, fp8, int8 and int4 */
#endif
    return 0;
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

static void tiles16(const void *arg, long first, long end) {
    for (long tile = first; tile < end; tile++) tile16(arg, tile);
}

/* From this many vectors on, the tiles beat a dot product per (row, vector). */
enum { TILE_BATCH = 8, STREAM_OUTPUT = 1 << 19 };
#endif

/* A few vectors at a time still read the weights once: torch's fp32 product of a few rows
 * by a wide matrix is up to 6x slower than that. */
long gemv(const void *w, const void *x, float *out, long rows, long cols, long batch,
          enum weight_kind kind, int threads) {
    threads = threads < 1 ? 1 : threads;
#if defined(__AVX512F__)
    if (kind == KIND_FP32 && batch >= TILE_BATCH) {
        const long lanes = (batch + 15) / 16 * 16;
        long failed = 0;
        float *xt = scratch(cols * lanes, sizeof(float), 1, &failed);
        if (failed) return failed;
        for (long b = 0; b < batch; b++)
            for (long k = 0; k < cols; k++) xt[k * lanes + b] = ((const float *)x)[b * cols + k];
        tiles_t t = {w, xt, out, rows, cols, batch, lanes, rows * batch >= STREAM_OUTPUT};
        job_t job = {0};
        job.rows = (rows + 15) / 16;
        job.each = tiles16;
        job.ctx = &t;
        /* about eight claims per thread: each claim is a trip of the counter's cache line
         * between the cores */
        job.chunk = job.rows / (8L * threads);
        job.chunk = job.chunk < 1 ? 1 : job.chunk > 64 ? 64 : job.chunk;
        run_threads(&job, threads);
        free(xt);
        return 0;
    }
#endif
    float *widened = NULL;
#if defined(MISTRAL_NEMO_AVX2)
    if (kind == KIND_BF16 || kind == KIND_FP8) {
        long failed = 0;
        widened = scratch(batch * cols, sizeof(float), 0, &failed);
        if (failed) return failed;
        for (long i = 0; i < batch * cols; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        x = widened;
    }
#endif
    const products_t p = {w, x, out, rows, cols, batch, kind};
    job_t job = {.rows = rows, .each = product_rows, .ctx = &p};
    run_threads(&job, threads);
    free(widened);
    return 0;
}

int gemv_tiled(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
