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
 * The code is in parts, one concept each, in _speedups_c/ (crc.h: the CRC-32; fields.h: the
 * attribute access and the lock; direct.h: "always" mode's pwrite of records; lean.h: the
 * lean paths; receive.h: the subscriber's receive straight from libzmq, which has no twin in
 * _lean.py -- where it is not available the subscriber's Python loop receives, see
 * persizmq/_subscriber/_fast_receive.py; records.h: the record loops; uninterrupted.h:
 * run_uninterrupted); this file includes them into one
 * translation unit and holds the module's table and init.
 *
 * SOURCE_SHA256 (when setup.py built the module) is the SHA-256 of this file and its parts as
 * compiled: the tests compare it with the files, so a module left over from an older source
 * (an editable install is not rebuilt by a merge) is not taken for this one.
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
    *s_base, *s_pos_dirty, *s_popped, *s_underlying, *s_meta;
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

/* The parts, in the order they build on each other (one translation unit: every function
 * stays static). */
#include "_speedups_c/crc.h"
#include "_speedups_c/fields.h"
#include "_speedups_c/direct.h"
#include "_speedups_c/lean.h"
#include "_speedups_c/receive.h"
#include "_speedups_c/records.h"
#include "_speedups_c/uninterrupted.h"

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
    {"write_at", (PyCFunction)(void (*)(void))write_at, METH_FASTCALL,
     "write_at(writer, fd, data, index, meta) -> None: \"always\" mode's pwrite of records, "
     "then the writer's end moved past them (and its metadata replaced by meta, unless None)."},
    {"bind_zmq", (PyCFunction)bind_zmq, METH_O,
     "bind_zmq(path) -> (major, minor, patch) or None: find the libzmq of the loaded file."},
    {"receive", (PyCFunction)(void (*)(void))receive, METH_FASTCALL,
     "receive(sock, limit, multipart) -> (messages, errno): up to limit whole messages."},
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
    INTERN(s_underlying, "underlying");
    INTERN(s_meta, "meta");
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
