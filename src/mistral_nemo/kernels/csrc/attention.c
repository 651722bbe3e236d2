/* Attention of each sequence's new token over its cached keys and values, split in spans of
 * positions that the threads share (the plan and the layout: attention_t in kernels.h). */
#include <math.h>

#include "kernels.h"

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

static void attend_job(const attentions_t *all, long job) {
    long i = 0;
    while (job >= all->first[i + 1]) i++;
    attend_span(&all->seqs[i], job - all->first[i]);
}

void attend_jobs(const void *all, long first, long end) {
    for (long job = first; job < end; job++) attend_job(all, job);
}

long plan_spans(attention_t *a, int threads) {
    long spans = (4L * threads + a->kv - 1) / a->kv, most = (a->n + SPAN - 1) / SPAN;
    spans = spans < most ? spans : most;
    a->span = (a->n + spans - 1) / spans;
    a->spans = (a->n + a->span - 1) / a->span;
    return (long)a->heads * a->spans * (a->span + a->hd + 2);
}

void merge_spans(const attention_t *a, float *out) {
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
