/* Fused CPU kernels for codec int8-blockwise: one pass per 256-element block instead of one pass per tensor op.
 *
 * The math is exactly that of int8_blockwise.py (which documents the format and keeps the torch version for CUDA
 * tensors and for installs without a C compiler): step = absmax / 127**2 rounded up to bfloat16, at least the
 * smallest normal float; code = round_half_even(sign(x) * sqrt(|x| * (1 / step))); value = code * |code| * step.
 * Decoding is exact in float32 (at most 7 + 7 + 8 significant bits), so every build decodes the same bytes to the
 * same bits. Built by setuptools as a plain shared library and called through ctypes, which releases the GIL.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK_SIZE 256
#define LEVELS 16129.0f             /* 127 ** 2 */
#define MIN_STEP 1.17549435e-38f    /* smallest normal float: keeps 1 / step finite */
#define ROUNDER 12582912.0f         /* 1.5 * 2 ** 23: y + ROUNDER holds round(y) in its low mantissa byte */

static inline float round_up_to_bfloat16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0xFFFFu) & 0xFFFF0000u;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Quantize n float32 values into ceil(n / 256) steps and n codes. Returns the first block holding NaN or inf
 * (nothing useful is written for it), or -1 when every value is finite. */
int64_t int8_blockwise_encode(const float *values, int64_t n, float *steps, int8_t *codes, int threads) {
    const int64_t blocks = (n + BLOCK_SIZE - 1) / BLOCK_SIZE;
    int64_t first_bad = -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t lo = block * BLOCK_SIZE, hi = lo + BLOCK_SIZE < n ? lo + BLOCK_SIZE : n;
        float absmax = 0.0f, poison = 0.0f; /* poison: x * 0 summed, NaN when any x is NaN or inf */
#pragma omp simd reduction(max : absmax) reduction(+ : poison)
        for (int64_t i = lo; i < hi; i++) {
            const float magnitude = fabsf(values[i]);
            absmax = magnitude > absmax ? magnitude : absmax;
            poison += values[i] * 0.0f;
        }
        float step = round_up_to_bfloat16(absmax / LEVELS);
        step = step < MIN_STEP ? MIN_STEP : step;
        steps[block] = step;
        if (poison != 0.0f || !(step < INFINITY)) {
#pragma omp critical
            first_bad = first_bad < 0 || block < first_bad ? block : first_bad;
            continue;
        }
        const float inverse = 1.0f / step;
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) {
            const float rounded = copysignf(sqrtf(fabsf(values[i]) * inverse), values[i]) + ROUNDER;
            int32_t bits;
            memcpy(&bits, &rounded, sizeof bits);
            codes[i] = (int8_t)bits; /* the low byte: the two's-complement code */
        }
    }
    return first_bad;
}

/* values[i] = code * |code| * step of its block, for n codes and ceil(n / 256) finite, non-negative steps. */
void int8_blockwise_decode(const float *steps, const int8_t *codes, int64_t n, float *values, int threads) {
    const int64_t blocks = (n + BLOCK_SIZE - 1) / BLOCK_SIZE;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t lo = block * BLOCK_SIZE, hi = lo + BLOCK_SIZE < n ? lo + BLOCK_SIZE : n;
        const float step = steps[block];
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) {
            const float code = (float)codes[i];
            values[i] = code * fabsf(code) * step;
        }
    }
}
