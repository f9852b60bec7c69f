/* persizmq._engine._speedups, part: "always" mode's write of records with pwrite (included
 * once by _speedups.c; see the theory of operation there, and persizmq/_engine/_writer.py).
 *
 * write_at(writer, fd, data, index, meta) writes ``data`` -- whole records, the first at the
 * writer's end -- with pwrite: everything after the first record's header, then that header
 * last, so that no record of ``data`` can be read before all of them are in the file (a reader
 * reaches the later ones only through the first). Then it moves the writer's end past them:
 * writer.pos, writer.index (= ``index``, the next message's index) and writer.dirty, and, for
 * an atomic batch, writer.meta (= ``meta``, the values with the batch's folded in; None: left
 * as it is), the stores of the Python reference (_lean.py_write_at) in its order. Being C,
 * nothing can run between the last write and those stores: no KeyboardInterrupt leaves valid
 * records in the file past the writer's end (a reader would deliver them, and the next add
 * would write other messages under their offsets), nor an atomic batch in the file without its
 * values in writer.meta (writer_meta() would not show them, and the next segment's snapshot
 * would lose them for good). A SIGINT that arrives during a pwrite is the likely case: its
 * handler runs as soon as this returns. The GIL is released during each pwrite; the caller
 * holds the queue's lock, so no other thread touches the writer meanwhile.
 *
 * A failed pwrite raises OSError with the writer unchanged (the caller makes it fail-stop: a
 * part of ``data`` may be in the file, never its first header). */

#ifndef PERSIZMQ_SPEEDUPS_DIRECT_H
#define PERSIZMQ_SPEEDUPS_DIRECT_H

#include <errno.h>
#include <limits.h>
#include <unistd.h>

/* pwrite all of [p, p + n) at ``at``: 0, or -1 with OSError set. */
static int pwrite_all(int fd, const char *p, Py_ssize_t n, long long at) {
    while (n > 0) {
        ssize_t wrote;
        int err;
        Py_BEGIN_ALLOW_THREADS
        wrote = pwrite(fd, p, (size_t)n, (off_t)at);
        err = errno;
        Py_END_ALLOW_THREADS
        if (wrote < 0) {
            if (err == EINTR) continue; /* a regular file: the write is simply made again */
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (wrote == 0) { /* never for a regular file with room reserved */
            errno = EIO;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        p += wrote;
        n -= wrote;
        at += wrote;
    }
    return 0;
}

static PyObject *write_at(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 5, "write_at(writer, fd, data, index, meta)") < 0) return NULL;
    PyObject *writer = args[0], *data = args[2], *meta = args[4];
    long fd_long = PyLong_AsLong(args[1]);
    if (fd_long == -1 && PyErr_Occurred()) return NULL;
    if (fd_long < 0 || fd_long > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "write_at: a file descriptor, got %ld", fd_long);
        return NULL;
    }
    int fd = (int)fd_long;
    if (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) < RECORD || !PyLong_Check(args[3]) ||
        (meta != Py_None && !PyDict_Check(meta))) {
        PyErr_SetString(PyExc_TypeError, "write_at: data must be bytes of whole records, index "
                                         "an int, meta a dict or None");
        return NULL;
    }
    long long start;
    if (fget_ll(writer, &F_w_pos, &start) < 0) return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    /* The new values first: after the writes nothing may fail before they are stored. */
    PyObject *end = PyLong_FromLongLong(start + (long long)n);
    if (end == NULL) return NULL;
    const char *p = PyBytes_AS_STRING(data);
    int failed = pwrite_all(fd, p + RECORD, n - RECORD, start + RECORD) < 0 ||
                 pwrite_all(fd, p, RECORD, start) < 0 || fset(writer, &F_w_pos, end) < 0 ||
                 fset(writer, &F_w_index, args[3]) < 0 || fset(writer, &F_w_dirty, Py_True) < 0 ||
                 (meta != Py_None && fset(writer, &F_w_meta, meta) < 0);
    Py_DECREF(end);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

#endif /* PERSIZMQ_SPEEDUPS_DIRECT_H */
