/* persizmq._engine._speedups: the lean paths and the record loops of the engine, in C.
 *
 * Theory of operation
 * ===================
 *
 * Every function here has a reference implementation in Python, in persizmq/_engine/_lean.py,
 * which is what runs when this module is not built (it is an optional extension) or when
 * PERSIZMQ_PURE_PYTHON=1 is set. The two must do exactly the same thing, down to the order of
 * the stores: the tests run both (tests/test_speedups.py compares them record by record).
 *
 * The lean paths (add, front, try_front, pop) take the queue's lock, check the same conditions
 * as the Python code, update the same attributes and release the lock. Being C, they are also
 * atomic with respect to signals: CPython runs a signal handler (and so raises
 * KeyboardInterrupt) only between bytecodes, never inside a C function that runs no Python
 * code, so no interrupt can fall between the acquire and the release, or between two stores of
 * one update. The one Python call made with the lock held, Condition.notify_all() for a waiting
 * consumer, comes after every store; an exception from it releases the lock and propagates.
 *
 * A lean path returns "not here" (False, or None for the reads) when any condition fails; the
 * caller then takes the general path, which checks everything again under the lock.
 *
 * The record loops (read_run, encode_records) are pure functions of their arguments. Record
 * layout (persizmq/_engine/_format.py): <u32 sync><u32 tag><u32 length><u32 crc> then the
 * payload, little-endian; crc = zlib.crc32(payload, seed) with
 * seed = (salt ^ tag * 0x9E3779B1 ^ length * 0x85EBCA77) mod 2**32.
 * The CRC is zlib.crc32's value, the function SPEC 4 names: computed here where the CPU allows
 * it and the self-check at import agrees, by calling zlib.crc32 otherwise (see "CRC-32").
 *
 * SOURCE_SHA256 (when setup.py built the module) is the SHA-256 of this file as compiled: the
 * tests compare it with the file, so a module left over from an older source (an editable
 * install is not rebuilt by a merge) is not taken for this one.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>
#include <stdint.h>
#include <string.h>

#ifndef Py_NewRef /* Python 3.9 */
static inline PyObject *compat_new_ref(PyObject *obj) {
    Py_INCREF(obj);
    return obj;
}
#define Py_NewRef compat_new_ref
#endif

#define RECORD 16
#define KIND_SHIFT 28
#define SINGLE_TAG (1u << KIND_SHIFT)
#define SEED_TAG 0x9E3779B1u
#define SEED_LENGTH 0x85EBCA77u
#define SLOT_SIZE 32
#define LAST_SLOT 127

/* Interned attribute names, and zlib.crc32. */
static PyObject *s_lock, *s_writer, *s_fast_add, *s_durability, *s_failed, *s_pos, *s_fast_end,
    *s_index, *s_fast_index, *s_salt, *s_map, *s_dirty, *s_added, *s_waiters, *s_cond,
    *s_notify_all, *s_acquire, *s_release, *s_consumer, *s_ahead, *s_ahead_i, *s_ahead_ok,
    *s_closing, *s_pops, *s_ahead_ends, *s_plog, *s_map_, *s_slot_, *s_previous_, *s_cursor,
    *s_base, *s_pos_dirty, *s_popped;
static PyObject *crc32_func;

/* ------------------------------------------------------------------ little helpers */

static inline uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void put_u64(unsigned char *p, uint64_t v) {
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

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

/* ------------------------------------------------------------------ attribute access
 *
 * The engine's hot objects (Queue, Writer, Durability, Consumer, Cursor, PositionLog, Mark)
 * declare the attributes used here in __slots__. A Field remembers, for the first type it
 * meets, the offset of that type's slot (an object member, as a __slots__ entry is), and then
 * reads and writes the slot directly, as the member descriptor itself would; for any other
 * type, or a name that is not such a slot, it takes the generic getattr/setattr. Values
 * written through a Field are ints, bools and None: dropping the old value runs no Python
 * code. */

typedef struct {
    PyObject **name;    /* the interned attribute name */
    PyTypeObject *type; /* the type the offset is for (NULL: not resolved yet) */
    Py_ssize_t offset;  /* of its object slot; -1: none, use the generic access */
} Field;

static void field_resolve(Field *f, PyTypeObject *type) {
    Py_INCREF(type);
    f->type = type;
    f->offset = -1;
    PyObject *descr = PyObject_GetAttr((PyObject *)type, *f->name);
    if (descr == NULL) {
        PyErr_Clear();
        return;
    }
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY) && member->offset > 0)
            f->offset = member->offset;
    }
    Py_DECREF(descr);
}

/* The slot of ``obj`` for ``f``, or NULL for the generic access. */
static inline PyObject **field_slot(PyObject *obj, Field *f) {
    PyTypeObject *type = Py_TYPE(obj);
    if (f->type != type) {
        if (f->type != NULL) return NULL;
        field_resolve(f, type);
    }
    if (f->offset < 0) return NULL;
    return (PyObject **)((char *)obj + f->offset);
}

/* getattr as a new reference. */
static inline PyObject *fget(PyObject *obj, Field *f) {
    PyObject **slot = field_slot(obj, f);
    if (slot != NULL && *slot != NULL) return Py_NewRef(*slot);
    return PyObject_GetAttr(obj, *f->name); /* raises AttributeError for an empty slot */
}

/* setattr (the value is not stolen). */
static inline int fset(PyObject *obj, Field *f, PyObject *value) {
    PyObject **slot = field_slot(obj, f);
    if (slot == NULL) return PyObject_SetAttr(obj, *f->name, value);
    PyObject *old = *slot;
    Py_INCREF(value);
    *slot = value;
    Py_XDECREF(old);
    return 0;
}

/* getattr of an int attribute. Returns 0 and sets *out, or -1 with an exception set. */
static int fget_ll(PyObject *obj, Field *f, long long *out) {
    PyObject *v = fget(obj, f);
    if (v == NULL) return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

/* getattr as a truth value: 1, 0, or -1 with an exception set. */
static int fget_true(PyObject *obj, Field *f) {
    PyObject *v = fget(obj, f);
    if (v == NULL) return -1;
    int t = v == Py_True ? 1 : v == Py_False ? 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* getattr is None: 1, 0, or -1 with an exception set. */
static int fget_is_none(PyObject *obj, Field *f) {
    PyObject *v = fget(obj, f);
    if (v == NULL) return -1;
    int t = v == Py_None;
    Py_DECREF(v);
    return t;
}

static int fset_ll(PyObject *obj, Field *f, long long value) {
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL) return -1;
    int r = fset(obj, f, v);
    Py_DECREF(v);
    return r;
}

static Field F_c_ahead = {&s_ahead, NULL, 0};
static Field F_c_ahead_ends = {&s_ahead_ends, NULL, 0};
static Field F_c_ahead_i = {&s_ahead_i, NULL, 0};
static Field F_c_ahead_ok = {&s_ahead_ok, NULL, 0};
static Field F_c_cursor = {&s_cursor, NULL, 0};
static Field F_c_plog = {&s_plog, NULL, 0};
static Field F_c_popped = {&s_popped, NULL, 0};
static Field F_c_pops = {&s_pops, NULL, 0};
static Field F_c_pos_dirty = {&s_pos_dirty, NULL, 0};
static Field F_d_failed = {&s_failed, NULL, 0};
static Field F_h_pops = {&s_pops, NULL, 0};
static Field F_k_base = {&s_base, NULL, 0};
static Field F_k_index = {&s_index, NULL, 0};
static Field F_k_pos = {&s_pos, NULL, 0};
static Field F_p_map = {&s_map_, NULL, 0};
static Field F_p_previous = {&s_previous_, NULL, 0};
static Field F_p_slot = {&s_slot_, NULL, 0};
static Field F_q_added = {&s_added, NULL, 0};
static Field F_q_closing = {&s_closing, NULL, 0};
static Field F_q_cond = {&s_cond, NULL, 0};
static Field F_q_consumer = {&s_consumer, NULL, 0};
static Field F_q_durability = {&s_durability, NULL, 0};
static Field F_q_fast_add = {&s_fast_add, NULL, 0};
static Field F_q_lock = {&s_lock, NULL, 0};
static Field F_q_waiters = {&s_waiters, NULL, 0};
static Field F_q_writer = {&s_writer, NULL, 0};
static Field F_w_dirty = {&s_dirty, NULL, 0};
static Field F_w_fast_end = {&s_fast_end, NULL, 0};
static Field F_w_fast_index = {&s_fast_index, NULL, 0};
static Field F_w_index = {&s_index, NULL, 0};
static Field F_w_map = {&s_map, NULL, 0};
static Field F_w_pos = {&s_pos, NULL, 0};
static Field F_w_salt = {&s_salt, NULL, 0};

/* Take ``lock`` (blocking) or try it (``blocking`` 0): 1 taken, 0 not taken, -1 error. */
static int take(PyObject *lock, int blocking) {
    PyObject *res;
    if (blocking) {
        res = PyObject_CallMethodNoArgs(lock, s_acquire);
    } else {
        res = PyObject_CallMethodOneArg(lock, s_acquire, Py_False);
    }
    if (res == NULL) return -1;
    int got = PyObject_IsTrue(res);
    Py_DECREF(res);
    return got;
}

/* Release ``lock``, keeping any exception that is already set. Returns -1 if the release
 * itself failed (its exception then replaces none: a pending one wins). */
static int give_back(PyObject *lock) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = PyObject_CallMethodNoArgs(lock, s_release);
    if (res == NULL) {
        if (type != NULL) {
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        return -1;
    }
    Py_DECREF(res);
    if (type != NULL) PyErr_Restore(type, value, tb);
    return 0;
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

/* ------------------------------------------------------------------ add */

/* The lean add with the lock held: 1 stored, 0 not here, -1 error. */
static int add_locked(PyObject *queue, PyObject *msg, long long limit) {
    int ok = fget_true(queue, &F_q_fast_add);
    if (ok <= 0) return ok;
    PyObject *durability = fget(queue, &F_q_durability);
    if (durability == NULL) return -1;
    ok = fget_is_none(durability, &F_d_failed);
    Py_DECREF(durability);
    if (ok <= 0) return ok;

    PyObject *writer = fget(queue, &F_q_writer);
    if (writer == NULL) return -1;
    int result = -1;
    PyObject *map = NULL;
    Py_buffer view;
    view.obj = NULL;
    long long pos, fast_end, index, fast_index, salt;
    Py_ssize_t length = PyBytes_GET_SIZE(msg);
    if (fget_ll(writer, &F_w_pos, &pos) < 0 || fget_ll(writer, &F_w_fast_end, &fast_end) < 0 ||
        fget_ll(writer, &F_w_index, &index) < 0 || fget_ll(writer, &F_w_fast_index, &fast_index) < 0)
        goto done;
    long long end = pos + RECORD + (long long)length;
    if (!(end <= fast_end && index < fast_index && (long long)length <= limit)) {
        result = 0;
        goto done;
    }
    if (fget_ll(writer, &F_w_salt, &salt) < 0) goto done;
    map = fget(writer, &F_w_map);
    if (map == NULL) goto done;
    if (PyObject_GetBuffer(map, &view, PyBUF_WRITABLE) < 0) goto done;
    if (pos < 0 || end > (long long)view.len) { /* never so: fast_end is within the file */
        result = 0;
        goto done;
    }
    uint32_t tag = SINGLE_TAG | (uint32_t)index;
    uint32_t crc;
    if (crc32_bytes(msg, record_seed((uint32_t)salt, tag, (uint32_t)length), &crc) < 0)
        goto done;
    unsigned char *at = (unsigned char *)view.buf + pos;
    put_u32(at, (uint32_t)salt);
    put_u32(at + 4, tag);
    put_u32(at + 8, (uint32_t)length);
    put_u32(at + 12, crc);
    memcpy(at + RECORD, PyBytes_AS_STRING(msg), (size_t)length);
    PyBuffer_Release(&view);
    view.obj = NULL;
    /* The stores in the Python order; none of these can fail but for memory. */
    long long added;
    if (fset_ll(writer, &F_w_pos, end) < 0 || fset_ll(writer, &F_w_index, index + 1) < 0 ||
        fset(writer, &F_w_dirty, Py_True) < 0 || fget_ll(queue, &F_q_added, &added) < 0 ||
        fset_ll(queue, &F_q_added, added + 1) < 0)
        goto done;
    result = 1;
    int waiters = fget_true(queue, &F_q_waiters);
    if (waiters < 0) {
        result = -1;
    } else if (waiters) {
        PyObject *cond = fget(queue, &F_q_cond);
        if (cond == NULL) {
            result = -1;
        } else {
            PyObject *res = PyObject_CallMethodNoArgs(cond, s_notify_all);
            Py_DECREF(cond);
            if (res == NULL)
                result = -1;
            else
                Py_DECREF(res);
        }
    }
done:
    if (view.obj != NULL) PyBuffer_Release(&view);
    Py_XDECREF(map);
    Py_DECREF(writer);
    return result;
}

static PyObject *lean_add(PyObject *Py_UNUSED(self), PyObject *const *args,
                          Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add(queue, msg, limit) takes 3 arguments");
        return NULL;
    }
    PyObject *queue = args[0], *msg = args[1];
    if (!PyBytes_Check(msg)) Py_RETURN_FALSE;
    long long limit = PyLong_AsLongLong(args[2]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    PyObject *lock = fget(queue, &F_q_lock);
    if (lock == NULL) return NULL;
    int got = take(lock, 1);
    if (got <= 0) {
        Py_DECREF(lock);
        if (got == 0) Py_RETURN_FALSE;
        return NULL;
    }
    int r = add_locked(queue, msg, limit);
    int released = give_back(lock);
    Py_DECREF(lock);
    if (r < 0 || released < 0) return NULL;
    return PyBool_FromLong(r);
}

/* ------------------------------------------------------------------ front */

/* The lean front with the lock held: a new reference to the message, Py_None (a new
 * reference) when not here, NULL on error. */
static PyObject *front_locked(PyObject *queue, PyObject *held) {
    PyObject *consumer = fget(queue, &F_q_consumer);
    if (consumer == NULL) return NULL;
    PyObject *result = NULL, *ahead = NULL, *pops = NULL;
    long long i, ok;
    if (fget_ll(consumer, &F_c_ahead_i, &i) < 0 || fget_ll(consumer, &F_c_ahead_ok, &ok) < 0) goto done;
    if (i >= ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int closing = fget_true(queue, &F_q_closing);
    if (closing < 0) goto done;
    if (closing) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    ahead = fget(consumer, &F_c_ahead);
    if (ahead == NULL) goto done;
    if (!PyList_Check(ahead) || i < 0 || i >= PyList_GET_SIZE(ahead)) {
        result = Py_NewRef(Py_None); /* never so: the general path sorts it out */
        goto done;
    }
    PyObject *msg = PyList_GET_ITEM(ahead, (Py_ssize_t)i); /* borrowed */
    pops = fget(consumer, &F_c_pops);
    if (pops == NULL || fset(held, &F_h_pops, pops) < 0) goto done;
    if (PyBytes_Check(msg)) {
        result = Py_NewRef(msg);
    } else {
        result = PySequence_List(msg);
    }
done:
    Py_XDECREF(pops);
    Py_XDECREF(ahead);
    Py_DECREF(consumer);
    return result;
}

static PyObject *lean_front(PyObject *Py_UNUSED(self), PyObject *const *args,
                            Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "front(queue, held) takes 2 arguments");
        return NULL;
    }
    PyObject *lock = fget(args[0], &F_q_lock);
    if (lock == NULL) return NULL;
    int got = take(lock, 1);
    if (got <= 0) {
        Py_DECREF(lock);
        if (got == 0) Py_RETURN_NONE;
        return NULL;
    }
    PyObject *result = front_locked(args[0], args[1]);
    int released = give_back(lock);
    Py_DECREF(lock);
    if (released < 0) {
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

/* try_front(queue, held): (True, message) from the run read ahead; (False, None) when the lock
 * is busy; None when the general path must answer. */
static PyObject *lean_try_front(PyObject *Py_UNUSED(self), PyObject *const *args,
                                Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "try_front(queue, held) takes 2 arguments");
        return NULL;
    }
    PyObject *lock = fget(args[0], &F_q_lock);
    if (lock == NULL) return NULL;
    int got = take(lock, 0);
    if (got <= 0) {
        Py_DECREF(lock);
        if (got == 0) return Py_BuildValue("(OO)", Py_False, Py_None);
        return NULL;
    }
    PyObject *msg = front_locked(args[0], args[1]);
    int released = give_back(lock);
    Py_DECREF(lock);
    if (msg == NULL || released < 0) {
        Py_XDECREF(msg);
        return NULL;
    }
    if (msg == Py_None) return msg;
    PyObject *result = PyTuple_Pack(2, Py_True, msg);
    Py_DECREF(msg);
    return result;
}

/* ------------------------------------------------------------------ pop */

static inline uint64_t slot_check(uint64_t offset, uint64_t base, uint64_t position) {
    return offset * 0x9E3779B97F4A7C15ull + base * 0xC2B2AE3D27D4EB4Full +
           position * 0x165667B19E3779F9ull + 0x27D4EB2F165667C5ull;
}

/* The lean pop with the lock held: 1 popped, 0 not here, -1 error. */
static int pop_locked(PyObject *queue, PyObject *held) {
    PyObject *consumer = fget(queue, &F_q_consumer);
    if (consumer == NULL) return -1;
    int result = -1;
    PyObject *ahead = NULL, *ends = NULL, *mark = NULL, *plog = NULL, *map = NULL,
             *cursor = NULL;
    Py_buffer view;
    view.obj = NULL;
    long long i, pops, slot, base, cindex, popped;
    if (fget_ll(consumer, &F_c_ahead_i, &i) < 0) goto done;
    ahead = fget(consumer, &F_c_ahead);
    if (ahead == NULL) goto done;
    ends = fget(consumer, &F_c_ahead_ends);
    if (ends == NULL) goto done;
    result = 0;
    if (!PyList_Check(ahead) || !PyList_Check(ends) || i < 0 || i >= PyList_GET_SIZE(ahead) ||
        i >= PyList_GET_SIZE(ends))
        goto done;
    result = -1;
    mark = fget(held, &F_h_pops);
    if (mark == NULL || fget_ll(consumer, &F_c_pops, &pops) < 0) goto done;
    if (mark != Py_None) {
        long long m = PyLong_AsLongLong(mark);
        if (m == -1 && PyErr_Occurred()) goto done;
        if (m != pops) {
            result = 0;
            goto done;
        }
    }
    plog = fget(consumer, &F_c_plog);
    if (plog == NULL) goto done;
    if (plog == Py_None) {
        result = 0;
        goto done;
    }
    int closing = fget_true(queue, &F_q_closing);
    if (closing < 0) goto done;
    if (closing) {
        result = 0;
        goto done;
    }
    PyObject *durability = fget(queue, &F_q_durability);
    if (durability == NULL) goto done;
    int healthy = fget_is_none(durability, &F_d_failed);
    Py_DECREF(durability);
    if (healthy <= 0) {
        result = healthy;
        goto done;
    }
    map = fget(plog, &F_p_map);
    if (map == NULL) goto done;
    if (map == Py_None) {
        result = 0;
        goto done;
    }
    long long end = PyLong_AsLongLong(PyList_GET_ITEM(ends, (Py_ssize_t)i));
    if (end == -1 && PyErr_Occurred()) goto done;
    cursor = fget(consumer, &F_c_cursor);
    if (cursor == NULL || fget_ll(cursor, &F_k_index, &cindex) < 0 ||
        fget_ll(cursor, &F_k_base, &base) < 0 || fget_ll(plog, &F_p_slot, &slot) < 0)
        goto done;
    long long next_slot = slot < LAST_SLOT ? slot + 1 : 0;
    if (PyObject_GetBuffer(map, &view, PyBUF_WRITABLE) < 0) goto done;
    if (next_slot < 0 || (next_slot + 1) * SLOT_SIZE > (long long)view.len) {
        result = 0; /* never so: the log is 128 slots */
        goto done;
    }
    long long index = cindex + 1;
    uint64_t offset = (uint64_t)base + (uint64_t)index;
    /* The Python order of the stores: consumer.ahead_i, cursor.pos, cursor.index, the log's
     * _previous and _slot, the entry, then the counters. (No signal can fall in between.) */
    if (fset_ll(consumer, &F_c_ahead_i, i + 1) < 0 || fset_ll(cursor, &F_k_pos, end) < 0 ||
        fset_ll(cursor, &F_k_index, index) < 0 || fset_ll(plog, &F_p_previous, slot) < 0 ||
        fset_ll(plog, &F_p_slot, next_slot) < 0)
        goto done;
    unsigned char *at = (unsigned char *)view.buf + next_slot * SLOT_SIZE;
    put_u64(at, offset);
    put_u64(at + 8, (uint64_t)base);
    put_u64(at + 16, (uint64_t)end);
    put_u64(at + 24, slot_check(offset, (uint64_t)base, (uint64_t)end));
    PyBuffer_Release(&view);
    view.obj = NULL;
    if (fset(consumer, &F_c_pos_dirty, Py_True) < 0 ||
        fset(held, &F_h_pops, Py_None) < 0 || fset_ll(consumer, &F_c_pops, pops + 1) < 0 ||
        fget_ll(consumer, &F_c_popped, &popped) < 0 || fset_ll(consumer, &F_c_popped, popped + 1) < 0)
        goto done;
    result = 1;
done:
    if (view.obj != NULL) PyBuffer_Release(&view);
    Py_XDECREF(cursor);
    Py_XDECREF(map);
    Py_XDECREF(plog);
    Py_XDECREF(mark);
    Py_XDECREF(ends);
    Py_XDECREF(ahead);
    Py_DECREF(consumer);
    return result;
}

static PyObject *lean_pop(PyObject *Py_UNUSED(self), PyObject *const *args,
                          Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop(queue, held) takes 2 arguments");
        return NULL;
    }
    PyObject *lock = fget(args[0], &F_q_lock);
    if (lock == NULL) return NULL;
    int got = take(lock, 1);
    if (got <= 0) {
        Py_DECREF(lock);
        if (got == 0) Py_RETURN_FALSE;
        return NULL;
    }
    int r = pop_locked(args[0], args[1]);
    int released = give_back(lock);
    Py_DECREF(lock);
    if (r < 0 || released < 0) return NULL;
    return PyBool_FromLong(r);
}

/* ------------------------------------------------------------------ read_run */

/* read_run(data, pos, index, limit, budget, salt, count, msgs, ends) -> (pos, index, taken)
 *
 * Decode and validate up to ``count`` single-frame records from ``pos`` (which should carry
 * message index ``index``), appending each payload to ``msgs`` and its end to ``ends``. Stops
 * before a record whose header would start beyond ``budget``, one that is not a valid
 * single-frame record ending at or before ``limit`` (a multipart record included: the caller
 * decodes those), or after ``count`` records. */
static PyObject *read_run(PyObject *Py_UNUSED(self), PyObject *const *args,
                          Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "read_run takes 9 arguments");
        return NULL;
    }
    long long pos = PyLong_AsLongLong(args[1]);
    long long index = PyLong_AsLongLong(args[2]);
    long long limit = PyLong_AsLongLong(args[3]);
    long long budget = PyLong_AsLongLong(args[4]);
    long long salt = PyLong_AsLongLong(args[5]);
    long long count = PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    PyObject *msgs = args[7], *ends = args[8];
    if (!PyList_Check(msgs) || !PyList_Check(ends)) {
        PyErr_SetString(PyExc_TypeError, "read_run: msgs and ends must be lists");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    if (limit > (long long)view.len) limit = (long long)view.len;
    long long taken = 0;
    int failed = 0;
    while (taken < count && pos >= 0 && pos + RECORD <= budget && pos + RECORD <= limit) {
        const unsigned char *at = buf + pos;
        uint32_t sync = get_u32(at), tag = get_u32(at + 4), length = get_u32(at + 8),
                 crc = get_u32(at + 12);
        long long stop = pos + RECORD + (long long)length;
        if ((long long)sync != salt || stop > limit ||
            (long long)tag != index + (long long)SINGLE_TAG)
            break;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)at + RECORD, length);
        if (payload == NULL) {
            failed = 1;
            break;
        }
        uint32_t got;
        if (crc32_bytes(payload, record_seed(sync, tag, length), &got) < 0) {
            Py_DECREF(payload);
            failed = 1;
            break;
        }
        if (got != crc) {
            Py_DECREF(payload);
            break;
        }
        PyObject *end_obj = PyLong_FromLongLong(stop);
        if (end_obj == NULL || PyList_Append(msgs, payload) < 0) {
            Py_XDECREF(end_obj);
            Py_DECREF(payload);
            failed = 1;
            break;
        }
        Py_DECREF(payload);
        if (PyList_Append(ends, end_obj) < 0) {
            /* keep the two lists the same length */
            Py_DECREF(end_obj);
            PySequence_DelItem(msgs, PyList_GET_SIZE(msgs) - 1);
            failed = 1;
            break;
        }
        Py_DECREF(end_obj);
        pos = stop;
        index += 1;
        taken += 1;
    }
    PyBuffer_Release(&view);
    if (failed) return NULL;
    return Py_BuildValue("(LLL)", pos, index, taken);
}

/* ------------------------------------------------------------------ encode_records */

/* encode_records(records, salt, index) -> bytes: the records of a batch, joined. ``records``
 * is a list of (payload: bytes, kind: int); the first carries message index ``index``. */
static PyObject *encode_records(PyObject *Py_UNUSED(self), PyObject *const *args,
                                Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_records(records, salt, index) takes 3 arguments");
        return NULL;
    }
    PyObject *records = args[0];
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "encode_records: records must be a list");
        return NULL;
    }
    unsigned long long salt = PyLong_AsUnsignedLongLong(args[1]);
    long long index = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(records);
    Py_ssize_t total = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(records, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyLong_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "encode_records: expected (bytes, int) records");
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        if (len > PY_SSIZE_T_MAX - total - RECORD) {
            PyErr_SetString(PyExc_OverflowError, "encode_records: the batch is too large");
            return NULL;
        }
        total += RECORD + len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) return NULL;
    unsigned char *at = (unsigned char *)PyBytes_AS_STRING(out);
    /* The list may not change under us: no Python code runs in this loop but zlib.crc32. */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(records, k);
        PyObject *payload = PyTuple_GET_ITEM(item, 0);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        if (kind == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        uint32_t length = (uint32_t)PyBytes_GET_SIZE(payload);
        uint32_t tag = ((uint32_t)kind << KIND_SHIFT) | (uint32_t)(index + k);
        uint32_t crc;
        if (crc32_bytes(payload, record_seed((uint32_t)salt, tag, length), &crc) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        put_u32(at, (uint32_t)salt);
        put_u32(at + 4, tag);
        put_u32(at + 8, length);
        put_u32(at + 12, crc);
        memcpy(at + RECORD, PyBytes_AS_STRING(payload), length);
        at += RECORD + length;
    }
    return out;
}

/* ------------------------------------------------------------------ plain_records, records_size */

/* plain_records(msgs, limit) -> list of (payload, 1) or None: the records of a batch when every
 * message of the list or tuple ``msgs`` is a bytes object (exactly) of at most ``limit`` bytes;
 * None for anything else (the caller's general loop then encodes, skips and checks). */
static PyObject *plain_records(PyObject *Py_UNUSED(self), PyObject *const *args,
                               Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plain_records(msgs, limit) takes 2 arguments");
        return NULL;
    }
    PyObject *msgs = args[0];
    if (!PyList_CheckExact(msgs) && !PyTuple_CheckExact(msgs)) Py_RETURN_NONE;
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(msgs);
    PyObject **items = PySequence_Fast_ITEMS(msgs);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *msg = items[k];
        if (!PyBytes_CheckExact(msg) || (long long)PyBytes_GET_SIZE(msg) > limit) Py_RETURN_NONE;
    }
    PyObject *kind = PyLong_FromLong(1);
    if (kind == NULL) return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(kind);
        return NULL;
    }
    /* No Python code runs in this loop: ``msgs`` cannot change under it. */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *record = PyTuple_Pack(2, items[k], kind);
        if (record == NULL) {
            Py_DECREF(kind);
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, record);
    }
    Py_DECREF(kind);
    return out;
}

/* records_size(records) -> int: the bytes of a batch's records, headers included. */
static PyObject *records_size(PyObject *Py_UNUSED(self), PyObject *records) {
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "records_size: records must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(records);
    long long total = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(records, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "records_size: expected (bytes, int) records");
            return NULL;
        }
        total += RECORD + (long long)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
    }
    return PyLong_FromLongLong(total);
}

/* ------------------------------------------------------------------ crc32_range */

/* crc32_range(buf, start, end, seed) -> int: zlib.crc32(buf[start:end], seed), without the copy
 * (0 <= start, 0 <= end). */
static PyObject *crc32_range(PyObject *Py_UNUSED(self), PyObject *const *args,
                             Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "crc32_range(buf, start, end, seed) takes 4 arguments");
        return NULL;
    }
    long long start = PyLong_AsLongLong(args[1]);
    long long end = PyLong_AsLongLong(args[2]);
    unsigned long long seed = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (start < 0 || end < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "crc32_range: expected 0 <= start and 0 <= end");
        return NULL;
    }
    /* slice semantics, as buf[start:end] */
    long long len = (long long)view.len;
    if (end > len) end = len;
    if (end < start) end = start;
    uint32_t crc;
    if (crc_fast) {
        crc = fast_crc32((uint32_t)seed, (const unsigned char *)view.buf + start,
                         (size_t)(end - start));
    } else {
        PyObject *part =
            PyBytes_FromStringAndSize((const char *)view.buf + start, (Py_ssize_t)(end - start));
        if (part == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
        int r = crc32_bytes(part, (uint32_t)seed, &crc);
        Py_DECREF(part);
        if (r < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

/* ------------------------------------------------------------------ run_uninterrupted
 *
 * CPython runs signal handlers (and so raises KeyboardInterrupt) in the main thread only, at
 * the points where its bytecode loop checks for them. A step of several stores that must not
 * be cut in the middle (a segment roll-over: see _writer) runs here in a short-lived thread of
 * its own, while the calling thread waits on a lock at C level with the GIL released, where no
 * signal handler runs. A signal that arrives meanwhile stays pending and is handled right after
 * this returns, as if it had arrived a moment later. */

typedef struct {
    PyObject *func;
    PyObject *result;
    PyObject *type, *value, *tb;
    PyThread_type_lock done;
} Job;

static void job_run(void *arg) {
    Job *job = (Job *)arg;
    PyGILState_STATE gil = PyGILState_Ensure();
    job->result = PyObject_CallNoArgs(job->func);
    if (job->result == NULL) PyErr_Fetch(&job->type, &job->value, &job->tb);
    PyGILState_Release(gil);
    PyThread_release_lock(job->done);
}

static PyObject *run_uninterrupted(PyObject *Py_UNUSED(self), PyObject *func) {
    Job job = {func, NULL, NULL, NULL, NULL, NULL};
    job.done = PyThread_allocate_lock();
    if (job.done == NULL) return PyErr_NoMemory();
    PyThread_acquire_lock(job.done, WAIT_LOCK);
    Py_INCREF(func);
    if (PyThread_start_new_thread(job_run, &job) == PYTHREAD_INVALID_THREAD_ID) {
        Py_DECREF(func);
        PyThread_release_lock(job.done);
        PyThread_free_lock(job.done);
        PyErr_SetString(PyExc_RuntimeError, "run_uninterrupted: cannot start a thread");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(job.done, WAIT_LOCK); /* no signal handler runs in this wait */
    Py_END_ALLOW_THREADS
    PyThread_release_lock(job.done);
    PyThread_free_lock(job.done);
    Py_DECREF(func);
    if (job.result == NULL) {
        PyErr_Restore(job.type, job.value, job.tb);
        return NULL;
    }
    return job.result;
}

/* ------------------------------------------------------------------ the module */

static PyMethodDef methods[] = {
    {"add", (PyCFunction)(void (*)(void))lean_add, METH_FASTCALL,
     "add(queue, msg, limit) -> bool: the lean add_message; False: take the general path."},
    {"front", (PyCFunction)(void (*)(void))lean_front, METH_FASTCALL,
     "front(queue, held) -> message or None: the lean front(); None: take the general path."},
    {"try_front", (PyCFunction)(void (*)(void))lean_try_front, METH_FASTCALL,
     "try_front(queue, held) -> (bool, message) or None: the lean try_front()."},
    {"pop", (PyCFunction)(void (*)(void))lean_pop, METH_FASTCALL,
     "pop(queue, held) -> bool: the lean pop_front(); False: take the general path."},
    {"read_run", (PyCFunction)(void (*)(void))read_run, METH_FASTCALL,
     "read_run(data, pos, index, limit, budget, salt, count, msgs, ends) -> (pos, index, n)."},
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     "encode_records(records, salt, index) -> bytes: a batch's records, joined."},
    {"plain_records", (PyCFunction)(void (*)(void))plain_records, METH_FASTCALL,
     "plain_records(msgs, limit) -> list of (bytes, 1) or None: a batch of plain messages."},
    {"records_size", (PyCFunction)records_size, METH_O,
     "records_size(records) -> int: the bytes of a batch's records, headers included."},
    {"crc32_range", (PyCFunction)(void (*)(void))crc32_range, METH_FASTCALL,
     "crc32_range(buf, start, end, seed) -> int: zlib.crc32(buf[start:end], seed)."},
    {"run_uninterrupted", (PyCFunction)run_uninterrupted, METH_O,
     "run_uninterrupted(func) -> func(): in another thread, while this one waits where no "
     "signal handler runs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "The engine's lean paths and record loops in C (see persizmq/_engine/_lean.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                  \
    do {                                                   \
        var = PyUnicode_InternFromString(text);            \
        if (var == NULL) return NULL;                      \
    } while (0)

PyMODINIT_FUNC PyInit__speedups(void) {
    INTERN(s_lock, "lock");
    INTERN(s_writer, "writer");
    INTERN(s_fast_add, "fast_add");
    INTERN(s_durability, "durability");
    INTERN(s_failed, "failed");
    INTERN(s_pos, "pos");
    INTERN(s_fast_end, "fast_end");
    INTERN(s_index, "index");
    INTERN(s_fast_index, "fast_index");
    INTERN(s_salt, "salt");
    INTERN(s_map, "map");
    INTERN(s_dirty, "dirty");
    INTERN(s_added, "added");
    INTERN(s_waiters, "waiters");
    INTERN(s_cond, "cond");
    INTERN(s_notify_all, "notify_all");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_consumer, "consumer");
    INTERN(s_ahead, "ahead");
    INTERN(s_ahead_i, "ahead_i");
    INTERN(s_ahead_ok, "ahead_ok");
    INTERN(s_closing, "closing");
    INTERN(s_pops, "pops");
    INTERN(s_ahead_ends, "ahead_ends");
    INTERN(s_plog, "plog");
    INTERN(s_map_, "_map");
    INTERN(s_slot_, "_slot");
    INTERN(s_previous_, "_previous");
    INTERN(s_cursor, "cursor");
    INTERN(s_base, "base");
    INTERN(s_pos_dirty, "pos_dirty");
    INTERN(s_popped, "popped");
    PyObject *zlib = PyImport_ImportModule("zlib");
    if (zlib == NULL) return NULL;
    crc32_func = PyObject_GetAttrString(zlib, "crc32");
    Py_DECREF(zlib);
    if (crc32_func == NULL) return NULL;
    crc_table_init();
    if (crc_self_check() < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "FAST_CRC", crc_fast) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef PERSIZMQ_SPEEDUPS_SHA256
    if (PyModule_AddStringConstant(m, "SOURCE_SHA256", PERSIZMQ_SPEEDUPS_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
