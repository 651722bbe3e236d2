/* Matrix-vector products for batch-1 decoding on the CPU: out[r] = dot(w[r, :], x).
 *
 * Decoding one token reads every weight once, so its speed is set by memory bandwidth.
 * torch's bf16 GEMV reaches about 2/3 of it on AVX-512 machines; this streams each weight
 * row once with independent accumulators and keeps up with the memory. Rows are shared by
 * `threads` POSIX threads. Built at first use with -march=native.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const void *w, *x;
    float *out;
    long rows, cols;
    int kind;          /* 0: bf16 (x bf16), 1: fp32 (x fp32), 2: fp8 e4m3fn (x bf16) */
    long next;         /* next unclaimed row, taken CHUNK rows at a time by all threads */
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

static void *run(void *arg) {
    job_t *j = arg;
    for (;;) {
        long r0 = __atomic_fetch_add(&j->next, CHUNK, __ATOMIC_RELAXED);
        if (r0 >= j->rows) return NULL;
        long r1 = r0 + CHUNK < j->rows ? r0 + CHUNK : j->rows;
        for (long r = r0; r < r1; r++) {
            if (j->kind == 0)
                j->out[r] = dot_bf16((const uint16_t *)j->w + r * j->cols, j->x, j->cols);
            else if (j->kind == 1)
                j->out[r] = dot_f32((const float *)j->w + r * j->cols, j->x, j->cols);
            else
                j->out[r] = dot_fp8((const uint8_t *)j->w + r * j->cols, j->x, j->cols);
        }
    }
}

/* 1 if this build has the vector path for `kind`, else 0 (the scalar loop is too slow). */
int gemv_vectorized(int kind) {
#if defined(__AVX512BF16__)
    if (kind == 0 || kind == 2) return 1;
#endif
#if defined(__AVX512F__)
    if (kind == 1) return 1;
#endif
    return 0;
}

void gemv(const void *w, const void *x, float *out, long rows, long cols, int kind, int threads) {
    enum { MAX_THREADS = 64 };
    pthread_t tid[MAX_THREADS];
    char joinable[MAX_THREADS] = {0};
    job_t job = {w, x, out, rows, cols, kind, 0};
    long chunks = (rows + CHUNK - 1) / CHUNK;
    if (threads > chunks) threads = (int)chunks;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    for (int t = 1; t < threads; t++) /* the calling thread works too */
        joinable[t] = pthread_create(&tid[t], NULL, run, &job) == 0;
    run(&job);
    for (int t = 1; t < threads; t++)
        if (joinable[t]) pthread_join(tid[t], NULL);
}
