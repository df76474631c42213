/*
 * dropout_mask.c: the counter-based dropout mask of nibbletune/modules/dropout.py.
 *
 * Element i of a flat tensor of n elements is kept when
 *     h       = mix32(mix32((uint32)(i / 2) ^ seed_lo) + seed_hi)     (uint32 arithmetic)
 *     bits(i) = i even ? h & 0xffff : h >> 16
 *     keep(i) = bits(i) >= threshold          threshold = round(p * 65536)
 * with mix32 the "lowbias32" integer hash (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
 * x *= 0x846ca68b; x ^= x >> 16). The mask is written as element values: `keep_bits` (the bit
 * pattern of 1 / (1 - p) in the output dtype) where kept, 0 where dropped, for 2- or 4-byte
 * elements, so the same function serves float32, float16 and bfloat16.
 *
 * Every element depends only on (seed, i), so the result never depends on the thread count;
 * the pure-torch twin in dropout.py computes the same bits.
 */
#include <stdint.h>

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

#define PAIRS_PER_CHUNK 16384

/* Threads to use for `pairs` element pairs: one when there is less than two chunks of work. */
static inline int thread_count(int64_t pairs, int num_threads) {
    int64_t chunks = (pairs + PAIRS_PER_CHUNK - 1) / PAIRS_PER_CHUNK;
    return chunks < 2 || num_threads < 1 ? 1 : num_threads;
}

static inline int64_t chunk_end(int64_t first, int64_t pairs) {
    return first + PAIRS_PER_CHUNK < pairs ? first + PAIRS_PER_CHUNK : pairs;
}

static inline uint32_t pair_hash(int64_t j, uint32_t seed_lo, uint32_t seed_hi) {
    return mix32(mix32((uint32_t)j ^ seed_lo) + seed_hi);
}

/* Full pairs [first_pair, last_pair): elements 2j and 2j + 1. */
static void fill32(uint32_t *out, int64_t first_pair, int64_t last_pair, uint32_t seed_lo, uint32_t seed_hi,
                   uint32_t threshold, uint32_t keep_bits) {
    for (int64_t j = first_pair; j < last_pair; j++) {
        uint32_t h = pair_hash(j, seed_lo, seed_hi);
        out[2 * j] = (h & 0xffffU) >= threshold ? keep_bits : 0U;
        out[2 * j + 1] = (h >> 16) >= threshold ? keep_bits : 0U;
    }
}

static void fill16(uint16_t *out, int64_t first_pair, int64_t last_pair, uint32_t seed_lo, uint32_t seed_hi,
                   uint32_t threshold, uint16_t keep_bits) {
    for (int64_t j = first_pair; j < last_pair; j++) {
        uint32_t h = pair_hash(j, seed_lo, seed_hi);
        out[2 * j] = (h & 0xffffU) >= threshold ? keep_bits : (uint16_t)0;
        out[2 * j + 1] = (h >> 16) >= threshold ? keep_bits : (uint16_t)0;
    }
}

/* Returns 0, or -1 for an unsupported element size. */
int nt_dropout_mask(void *out, int64_t n, int element_size, uint64_t seed, uint32_t threshold,
                    uint32_t keep_bits, int num_threads) {
    if (element_size != 2 && element_size != 4) return -1;
    uint32_t seed_lo = (uint32_t)seed, seed_hi = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2; /* full pairs; an odd n leaves element n - 1 for the end */
#pragma omp parallel for num_threads(thread_count(pairs, num_threads)) schedule(static)
    for (int64_t first = 0; first < pairs; first += PAIRS_PER_CHUNK) {
        int64_t last = chunk_end(first, pairs);
        if (element_size == 4)
            fill32((uint32_t *)out, first, last, seed_lo, seed_hi, threshold, keep_bits);
        else
            fill16((uint16_t *)out, first, last, seed_lo, seed_hi, threshold, (uint16_t)keep_bits);
    }
    if (n % 2) {
        uint32_t kept = (pair_hash(pairs, seed_lo, seed_hi) & 0xffffU) >= threshold;
        if (element_size == 4)
            ((uint32_t *)out)[n - 1] = kept ? keep_bits : 0U;
        else
            ((uint16_t *)out)[n - 1] = kept ? (uint16_t)keep_bits : (uint16_t)0;
    }
    return 0;
}

/* The mask value of element i (scale where kept, 0 where dropped) for a float32 tensor. */
static inline void pair_values(int64_t j, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale,
                               float *even, float *odd) {
    uint32_t h = pair_hash(j, seed_lo, seed_hi);
    *even = (h & 0xffffU) >= threshold ? scale : 0.0f;
    *odd = (h >> 16) >= threshold ? scale : 0.0f;
}

/*
 * out[i] = x[i] * mask(i), or (accumulate) out[i] += grad[i] * mask(i), for float32, in one pass
 * over memory. The product is x * mask exactly as torch computes it (0 * inf is NaN, -x * 0 is
 * -0). Returns 0.
 */
int nt_dropout_apply_f32(const float *x, float *out, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                         int accumulate, int num_threads) {
    uint32_t seed_lo = (uint32_t)seed, seed_hi = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
#pragma omp parallel for num_threads(thread_count(pairs, num_threads)) schedule(static)
    for (int64_t first = 0; first < pairs; first += PAIRS_PER_CHUNK) {
        int64_t last = chunk_end(first, pairs);
        if (accumulate) {
            for (int64_t j = first; j < last; j++) {
                float even, odd;
                pair_values(j, seed_lo, seed_hi, threshold, scale, &even, &odd);
                out[2 * j] += x[2 * j] * even;
                out[2 * j + 1] += x[2 * j + 1] * odd;
            }
        } else {
            for (int64_t j = first; j < last; j++) {
                float even, odd;
                pair_values(j, seed_lo, seed_hi, threshold, scale, &even, &odd);
                out[2 * j] = x[2 * j] * even;
                out[2 * j + 1] = x[2 * j + 1] * odd;
            }
        }
    }
    if (n % 2) {
        float even, odd;
        pair_values(pairs, seed_lo, seed_hi, threshold, scale, &even, &odd);
        if (accumulate)
            out[n - 1] += x[n - 1] * even;
        else
            out[n - 1] = x[n - 1] * even;
    }
    return 0;
}
