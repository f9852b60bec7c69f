/* persizmq._engine._speedups, part: the record loops (read_run, encode_records, plain_records, records_size, crc32_range) (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_RECORDS_H
#define PERSIZMQ_SPEEDUPS_RECORDS_H

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
    if (check_nargs(nargs, 9, "read_run(data, pos, index, limit, budget, salt, count, msgs, ends)") <
        0)
        return NULL;
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
    if (check_nargs(nargs, 3, "encode_records(records, salt, index)") < 0) return NULL;
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
    if (check_nargs(nargs, 2, "plain_records(msgs, limit)") < 0) return NULL;
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
    if (check_nargs(nargs, 4, "crc32_range(buf, start, end, seed)") < 0) return NULL;
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

#endif /* PERSIZMQ_SPEEDUPS_RECORDS_H */
