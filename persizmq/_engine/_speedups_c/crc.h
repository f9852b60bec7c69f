/* persizmq._engine._speedups, part: the records' CRC-32 (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_CRC_H
#define PERSIZMQ_SPEEDUPS_CRC_H

/* ------------------------------------------------------------------ CRC-32
 *
 * The records' CRC is zlib.crc32 (CRC-32, reflected polynomial 0xEDB88320). On x86-64 with
 * PCLMULQDQ it is computed here by carry-less multiplication, folding 64 bytes per step (the
 * method of Gopal et al., "Fast CRC computation for generic polynomials using PCLMULQDQ",
 * Intel 2009: the constants below are x^k mod P for the fold distances, and P and its Barrett
 * quotient), with a byte table for the bytes that do not fill a 16-byte block; elsewhere, and
 * if the self-check at import finds any difference from zlib.crc32, zlib.crc32 itself is
 * called. Either way the value is zlib.crc32's.
 */

static uint32_t crc_table[256];
static int crc_fast; /* 1: fast_crc32 is in use (checked against zlib.crc32 at import) */

static void crc_table_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* The register form (pre- and post-inverted by the caller). */
static inline uint32_t crc_bytes(uint32_t c, const unsigned char *p, size_t n) {
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_CLMUL 1

/* The register form over n bytes, n a multiple of 16 and at least 64. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t c,
                                                                   const unsigned char *p,
                                                                   size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    const __m128i mask32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 0x00));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 0x10));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 0x20));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 0x30));
    __m128i x5, x6, x7, x8;
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
    while (n >= 64) { /* four lanes, each folded 64 bytes forward */
        x5 = _mm_clmulepi64_si128(x1, k1k2, 0x00);
        x6 = _mm_clmulepi64_si128(x2, k1k2, 0x00);
        x7 = _mm_clmulepi64_si128(x3, k1k2, 0x00);
        x8 = _mm_clmulepi64_si128(x4, k1k2, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
        x2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
        x3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
        x4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(p + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(p + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(p + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(p + 0x30)));
        p += 64;
        n -= 64;
    }
    /* the four lanes into one, 16 bytes apart */
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (n >= 16) { /* the remaining blocks, one at a time */
        x2 = _mm_loadu_si128((const __m128i *)p);
        x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        p += 16;
        n -= 16;
    }
    /* 128 bits to 64 */
    x2 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, mask32);
    x1 = _mm_clmulepi64_si128(x1, k5, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    /* Barrett reduction to 32 bits */
    x2 = _mm_and_si128(x1, mask32);
    x2 = _mm_clmulepi64_si128(x2, poly, 0x10);
    x2 = _mm_and_si128(x2, mask32);
    x2 = _mm_clmulepi64_si128(x2, poly, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* zlib.crc32(p[0:n], seed) computed here (crc_fast must be set). */
static uint32_t fast_crc32(uint32_t seed, const unsigned char *p, size_t n) {
    uint32_t c = ~seed;
#ifdef HAVE_CLMUL
    if (n >= 64) {
        size_t blocks = n & ~(size_t)15;
        c = crc_fold(c, p, blocks);
        p += blocks;
        n -= blocks;
    }
#endif
    return ~crc_bytes(c, p, n);
}

/* zlib.crc32(payload, seed) through the zlib module (the function SPEC 4 names). Returns 0
 * and sets *out, or -1 with an exception set. */
static int crc32_bytes(PyObject *payload, uint32_t seed, uint32_t *out) {
    if (crc_fast) {
        *out = fast_crc32(seed, (const unsigned char *)PyBytes_AS_STRING(payload),
                          (size_t)PyBytes_GET_SIZE(payload));
        return 0;
    }
    PyObject *seed_obj = PyLong_FromUnsignedLong(seed);
    if (seed_obj == NULL) return -1;
    PyObject *args[2] = {payload, seed_obj};
    PyObject *res = PyObject_Vectorcall(crc32_func, args, 2, NULL);
    Py_DECREF(seed_obj);
    if (res == NULL) return -1;
    unsigned long v = PyLong_AsUnsignedLong(res);
    Py_DECREF(res);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    *out = (uint32_t)v;
    return 0;
}

static inline uint32_t record_seed(uint32_t salt, uint32_t tag, uint32_t length) {
    return salt ^ (uint32_t)(tag * SEED_TAG) ^ (uint32_t)(length * SEED_LENGTH);
}

/* Set crc_fast if this machine can, and fast_crc32 agrees with zlib.crc32 on every length from
 * 0 to 600 bytes of a fixed pseudo-random text and at every alignment (-1 on error). */
static int crc_self_check(void) {
    crc_fast = 0;
#ifdef HAVE_CLMUL
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("pclmul") || !__builtin_cpu_supports("sse4.1")) return 0;
#else
    return 0; /* the byte table alone is slower than zlib's own code */
#endif
    unsigned char text[616];
    uint32_t x = 0x2545F491u;
    for (size_t k = 0; k < sizeof text; k++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        text[k] = (unsigned char)x;
    }
    for (size_t start = 0; start < 16; start++) {
        for (size_t n = 0; n + start <= 600; n += (start == 0 ? 1 : 7)) {
            uint32_t seed = (uint32_t)(n * 0x9E3779B1u);
            PyObject *bytes = PyBytes_FromStringAndSize((const char *)text + start, (Py_ssize_t)n);
            if (bytes == NULL) return -1;
            uint32_t want;
            int r = crc32_bytes(bytes, seed, &want); /* crc_fast is 0: zlib.crc32 */
            Py_DECREF(bytes);
            if (r < 0) return -1;
            if (fast_crc32(seed, text + start, n) != want) return 0;
        }
    }
    crc_fast = 1;
    return 0;
}

#endif /* PERSIZMQ_SPEEDUPS_CRC_H */
