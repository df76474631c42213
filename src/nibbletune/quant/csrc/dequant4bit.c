/*
 * dequant4bit.c: blockwise 4-bit (NF4/FP4) dequantization for the CPU, bit-exact with
 * nibbletune/quant/reference.py.
 *
 * Format (docs: shared/nf4-format.md). Element i of the flat tensor is the 4-bit code
 *     code(i) = (packed[i / 2] >> (i % 2 == 0 ? 4 : 0)) & 15      (element 2i: HIGH nibble)
 * and decodes to
 *     value(i) = codebook[code(i)] * scale[i / blocksize]          (one float32 multiply)
 * then one cast to the output dtype. With double quantization the per-block scale is
 *     scale[b] = nested_map[absmax_codes[b]] * nested_absmax[b / nested_blocksize] + offset
 * computed as two separate float32 operations (the file is compiled with
 * -ffp-contract=off, so no fused multiply-add can change a bit). It is recovered once per
 * block inside the kernel, which costs nothing next to the block's elements.
 *
 * Casts follow what torch does on an AVX2 CPU, so results agree bit for bit (NaNs included):
 *   bfloat16: round to nearest even on the bit pattern, (x + 0x7fff + lsb) >> 16; any NaN
 *             becomes 0xffff (torch's vectorized cvtfp32_bf16).
 *   float16:  IEEE round to nearest even with subnormals and overflow to inf (F16C's
 *             vcvtps2ph; the scalar f32_to_f16 below reproduces it, NaN payload included).
 *
 * AVX2 path. A block's output can take only 16 values, so they are computed once per block:
 *   table[c] = codebook[c] * scale (16 float32 multiplies, the same products as multiplying
 *   after the lookup), cast to the output dtype as above.
 *   16-bit outputs: the 16 results are split into a low-byte and a high-byte table for
 *   vpshufb. Per 32 elements (16 packed bytes): vpshufb copies each byte into two byte
 *   slots (arranged so the final unpacks need no lane crossing), the nibble of each slot is
 *   isolated with one shift and two masks, two vpshufb look up the low and high result
 *   bytes, and unpacklo/unpackhi interleave them into 32 finished outputs.
 *   float32 output: the 16 scaled values live in two __m256; 8 codes are widened to int32
 *   and looked up with permutevar8x32 on the low 3 bits and blendv on bit 3.
 * A block whose scale is not finite (inf * 0 gives NaN, which the table path does not round
 * like torch) and a tail of fewer than 32 elements take the scalar path: same bits.
 *
 * Threads: OpenMP hands out chunks of whole blocks dynamically. Every output element is
 * computed independently, so the bytes never depend on the thread count or the chunking.
 */
#define _DEFAULT_SOURCE /* MADV_HUGEPAGE */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h> /* _mm_getcsr: workers use the caller's flush-to-zero/denormal mode */
#endif

enum { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2 };

/* Work below this many elements (~60 us on one core) runs on one thread: waking the pool costs more. */
#define PARALLEL_MIN_ELEMENTS 262144
/* Unit of work a thread takes at a time. */
#define CHUNK_ELEMENTS 65536

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* rounds past 65504: inf */
    if (ax >= 0x38800000u) {                                     /* normal half, >= 2^-14 */
        uint32_t r = ax - (112u << 23) + 0x0fffu + ((ax >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (ax <= 0x33000000u) return (uint16_t)sign;               /* <= 2^-25: rounds to 0 */
    /* subnormal half: round(|f| * 2^24) to nearest even */
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;                                   /* 14..24 */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

/* Elements [start, stop) of one block, one at a time. */
static void decode_scalar(const uint8_t *packed, const float *codebook, float scale,
                          int64_t start, int64_t stop, int out_dtype, void *out) {
    for (int64_t i = start; i < stop; i++) {
        uint8_t byte = packed[i >> 1];
        float v = codebook[(i & 1) ? (byte & 15) : (byte >> 4)] * scale;
        if (out_dtype == OUT_F32) ((float *)out)[i] = v;
        else if (out_dtype == OUT_F16) ((uint16_t *)out)[i] = f32_to_f16(v);
        else ((uint16_t *)out)[i] = f32_to_bf16(v);
    }
}

#if defined(__AVX2__)
/* 16-bit outputs (bf16/fp16): the block's 16 possible results, looked up with vpshufb. */
static inline __m256i bf16x16(__m256 a, __m256 b) {
    /* round to nearest even on the bit pattern, for non-NaN floats; 16 results in order */
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i x = _mm256_castps_si256(a), y = _mm256_castps_si256(b);
    x = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias),
                                           _mm256_and_si256(_mm256_srli_epi32(x, 16), one)), 16);
    y = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(y, bias),
                                           _mm256_and_si256(_mm256_srli_epi32(y, 16), one)), 16);
    /* packus works per 128-bit lane: [x0-3 y0-3 x4-7 y4-7] -> reorder quadwords 0,2,1,3 */
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(x, y), 0xd8);
}

/* The 16 results of a block as two vpshufb tables (low bytes, high bytes), each in both lanes. */
static inline void byte_planes(__m256i words, __m256i *low_bytes, __m256i *high_bytes) {
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m256i s = _mm256_shuffle_epi8(words, split);  /* quadwords: lo 0-7, hi 0-7, lo 8-15, hi 8-15 */
    *low_bytes = _mm256_permute4x64_epi64(s, 0x88);
    *high_bytes = _mm256_permute4x64_epi64(s, 0xdd);
}

/* Elements [start, stop) of one block with a finite scale, 16-bit output; start is even. */
static void decode_avx2_16bit(const uint8_t *packed, const float *codebook, float scale,
                              int64_t start, int64_t stop, int out_dtype, uint16_t *out) {
    const __m256 s = _mm256_set1_ps(scale);
    __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(codebook), s);
    __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(codebook + 8), s);
    __m256i words;
    if (out_dtype == OUT_BF16) {
        words = bf16x16(v0, v1);
    } else {
#if defined(__F16C__)
        words = _mm256_set_m128i(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT),
                                 _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
#else
        decode_scalar(packed, codebook, scale, start, stop, out_dtype, out);
        return;
#endif
    }
    __m256i table_lo, table_hi;
    byte_planes(words, &table_lo, &table_hi);
    /* lane 0 gets bytes 0-3 and 8-11 (elements 0-7, 16-23), lane 1 bytes 4-7 and 12-15
       (elements 8-15, 24-31), so unpacklo/unpackhi below give elements 0-15 and 16-31 */
    const __m256i spread = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 8, 8, 9, 9, 10, 10, 11, 11,
                                            4, 4, 5, 5, 6, 6, 7, 7, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m256i even_code = _mm256_set1_epi16(0x000f), odd_code = _mm256_set1_epi16(0x0f00);
    int64_t i = start;
    for (; i + 32 <= stop; i += 32) {
        __m256i x = _mm256_shuffle_epi8(
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(packed + (i >> 1)))), spread);
        /* each 16-bit word holds one byte twice: low byte -> high nibble, high byte -> low nibble */
        __m256i codes = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), even_code),
                                        _mm256_and_si256(x, odd_code));
        __m256i lo = _mm256_shuffle_epi8(table_lo, codes), hi = _mm256_shuffle_epi8(table_hi, codes);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_unpacklo_epi8(lo, hi));
        _mm256_storeu_si256((__m256i *)(out + i + 16), _mm256_unpackhi_epi8(lo, hi));
    }
    decode_scalar(packed, codebook, scale, i, stop, out_dtype, out);
}

/* float32 output: the scaled codebook in two __m256, permutevar8x32 + blendv on bit 3. */
static inline __m256 lookup8(__m128i codes8, __m256 table_lo, __m256 table_hi) {
    __m256i idx = _mm256_cvtepu8_epi32(codes8);
    __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static void decode_avx2_f32(const uint8_t *packed, const float *codebook, float scale,
                            int64_t start, int64_t stop, float *out) {
    const __m256 s = _mm256_set1_ps(scale);
    /* codebook[c] * scale for all 16 codes: the same products as multiplying after lookup */
    const __m256 table_lo = _mm256_mul_ps(_mm256_loadu_ps(codebook), s);
    const __m256 table_hi = _mm256_mul_ps(_mm256_loadu_ps(codebook + 8), s);
    const __m128i low4 = _mm_set1_epi8(15);
    int64_t i = start;
    for (; i + 32 <= stop; i += 32) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(packed + (i >> 1)));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4), lo = _mm_and_si128(bytes, low4);
        __m128i c0 = _mm_unpacklo_epi8(hi, lo), c1 = _mm_unpackhi_epi8(hi, lo);
        _mm256_storeu_ps(out + i, lookup8(c0, table_lo, table_hi));
        _mm256_storeu_ps(out + i + 8, lookup8(_mm_srli_si128(c0, 8), table_lo, table_hi));
        _mm256_storeu_ps(out + i + 16, lookup8(c1, table_lo, table_hi));
        _mm256_storeu_ps(out + i + 24, lookup8(_mm_srli_si128(c1, 8), table_lo, table_hi));
    }
    decode_scalar(packed, codebook, scale, i, stop, OUT_F32, out);
}
#endif

static inline int is_finite(float f) { return (f32_bits(f) & 0x7f800000u) != 0x7f800000u; }

/* Blocks [b0, b1). The nested block index is stepped, not divided, once per block. */
static void decode_blocks(int64_t b0, int64_t b1, const uint8_t *packed, int64_t n, int64_t blocksize,
                          const float *codebook, const float *absmax, const uint8_t *absmax_codes,
                          const float *nested_map, const float *nested_absmax, int64_t nested_blocksize,
                          float offset, int out_dtype, void *out) {
    int64_t nested = absmax_codes ? b0 / nested_blocksize : 0;
    int64_t within = absmax_codes ? b0 % nested_blocksize : 0;
    for (int64_t b = b0; b < b1; b++) {
        float scale;
        if (absmax_codes) {
            float scaled = nested_map[absmax_codes[b]] * nested_absmax[nested];  /* two float32 ops, */
            scale = scaled + offset;                                             /* never fused */
            if (++within == nested_blocksize) within = 0, nested++;
        } else {
            scale = absmax[b];
        }
        int64_t start = b * blocksize, stop = start + blocksize < n ? start + blocksize : n;
#if defined(__AVX2__)
        if (!(start & 1) && is_finite(scale)) {
            if (out_dtype == OUT_F32) decode_avx2_f32(packed, codebook, scale, start, stop, (float *)out);
            else decode_avx2_16bit(packed, codebook, scale, start, stop, out_dtype, (uint16_t *)out);
            continue;
        }
#endif
        decode_scalar(packed, codebook, scale, start, stop, out_dtype, out);
    }
}

/* 2 when this build has the AVX2 path, 0 for the scalar one (reported by the Python side). */
int nt_dequant4bit_simd_level(void) {
#if defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}

/*
 * Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched output
 * buffer: first-touch page faults then cost one per 2 MiB instead of one per 4 KiB, which is
 * most of the time of a fresh multi-megabyte output. A hint only; returns madvise's result.
 */
int nt_advise_hugepages(void *buffer, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)buffer + huge - 1) & ~(huge - 1);
    uintptr_t stop = ((uintptr_t)buffer + (uintptr_t)bytes) & ~(huge - 1);
    if (bytes <= 0 || stop <= start) return 0;
    return madvise((void *)start, stop - start, MADV_HUGEPAGE);
#else
    (void)buffer, (void)bytes;
    return 0;
#endif
}

/*
 * Decode n elements. absmax_codes == NULL: float32 absmax[num_blocks]; otherwise uint8 codes
 * with nested_map[256], nested_absmax[ceil(num_blocks / nested_blocksize)] and offset.
 * out_dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0, or -1 for invalid arguments.
 */
int nt_dequant4bit(const uint8_t *packed, int64_t n, int64_t blocksize, const float *codebook,
                   const float *absmax, const uint8_t *absmax_codes, const float *nested_map,
                   const float *nested_absmax, int64_t nested_blocksize, float offset,
                   int out_dtype, void *out, int num_threads) {
    if (n < 0 || blocksize <= 0 || out_dtype < 0 || out_dtype > 2 || !packed || !codebook || !out) return -1;
    if (absmax_codes ? (!nested_map || !nested_absmax || nested_blocksize <= 0) : !absmax) return -1;
    int64_t blocks = (n + blocksize - 1) / blocksize;
    int threads = num_threads > 0 ? num_threads : 1;
    if (n < PARALLEL_MIN_ELEMENTS || blocks < threads) threads = 1;
    if (threads == 1) {
        decode_blocks(0, blocks, packed, n, blocksize, codebook, absmax, absmax_codes, nested_map,
                      nested_absmax, nested_blocksize, offset, out_dtype, out);
        return 0;
    }
    /* Chunks of about CHUNK_ELEMENTS handed out dynamically: on a busy machine a thread that
       is not scheduled leaves its share to the others (the join still waits for it to arrive). */
    int64_t chunk = (CHUNK_ELEMENTS + blocksize - 1) / blocksize;
    int64_t chunks = (blocks + chunk - 1) / chunk;
#if defined(__SSE__)
    const unsigned int caller_csr = _mm_getcsr();
#endif
#pragma omp parallel num_threads(threads)
    {
#if defined(__SSE__)
        /* torch.set_flush_denormal sets FTZ/DAZ on the calling thread only; without this a
           chunk's bits would depend on which thread decoded it */
        const unsigned int own_csr = _mm_getcsr();
        _mm_setcsr(caller_csr);
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t b0 = c * chunk, b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
            decode_blocks(b0, b1, packed, n, blocksize, codebook, absmax, absmax_codes, nested_map,
                          nested_absmax, nested_blocksize, offset, out_dtype, out);
        }
#if defined(__SSE__)
        _mm_setcsr(own_csr);
#endif
    }
    return 0;
}
