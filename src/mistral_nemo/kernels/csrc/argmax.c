#include "kernels.h"

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

static void argmax_some_rows(const void *arg, long first, long end) {
    for (long row = first; row < end; row++) argmax_row(arg, row);
}

void argmax_rows(const float *x, long rows, long cols, long *out, int threads) {
    argmax_t a = {x, cols, out};
    job_t job = {0};
    job.rows = rows;
    job.each = argmax_some_rows;
    job.ctx = &a;
    job.chunk = 1;
    run_threads(&job, threads);
}
