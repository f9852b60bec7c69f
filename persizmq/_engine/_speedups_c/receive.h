/* persizmq._engine._speedups, part: the subscriber's receive (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_RECEIVE_H
#define PERSIZMQ_SPEEDUPS_RECEIVE_H

/* ------------------------------------------------------------------ receive
 *
 * The receiving thread of a ThreadedSubscriber spends most of its time in pyzmq's per-call
 * machinery, not in libzmq: a non-copying recv builds a zmq.Frame (to learn whether more frames
 * follow), and asking RCVMORE of a copying recv costs more still (1.2-1.8 us a message here,
 * against 0.1-0.2 us in zmq_msg_recv). receive() takes up to `limit` messages from a socket in
 * one call, straight from libzmq, each whole (all of a multipart message's frames), each frame
 * copied once into a bytes object -- what `frame.bytes` made.
 *
 * The libzmq functions are the ones pyzmq itself calls. bind_zmq() is given the file of pyzmq's
 * compiled backend, which is loaded already; dlopen() of a loaded file returns its handle, and
 * dlsym() on a handle looks in that object and then in the objects it depends on: so the symbols
 * found are those of the libzmq pyzmq was linked with (a bundled copy, the system's, or built
 * in), never another copy's -- a socket of one copy handed to another would be memory
 * corruption. Where anything is missing (no dlopen, symbols not exported), bind_zmq() says so
 * and the Python receive loop serves.
 *
 * receive() runs with the GIL held: every call is non-blocking (ZMQ_DONTWAIT), so it never
 * waits, and the socket is used by one thread only (the subscriber's).
 *
 * The handle is read from the socket object, never kept. Another thread may close the socket
 * (pyzmq's close() runs under the GIL and sets the handle to NULL); libzmq's reaper then frees
 * the socket, and a new socket may be given the same memory -- a handle kept from before the
 * close would then receive another socket's messages, from a second thread. So receive() reads
 * `sock.underlying` under the GIL it holds, and reads it again after anything that can run
 * Python code and so let another thread in: creating a list (a GC-tracked object) may start a
 * collection, whose finalizers and callbacks are Python code. A NULL handle ends the take with
 * ENOTSOCK, what pyzmq's recv raises for a closed socket. */

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <errno.h>
#define RECEIVE_AVAILABLE 1
#else
#define RECEIVE_AVAILABLE 0
#endif

#define Z_DONTWAIT 1

typedef union { /* zmq_msg_t: 64 bytes, pointer-aligned (zmq.h) */
    unsigned char bytes[64];
    void *align_ptr;
    double align_double;
} zmsg;

static int (*z_msg_init)(zmsg *);
static int (*z_msg_recv)(zmsg *, void *, int);
static int (*z_msg_close)(zmsg *);
static void *(*z_msg_data)(zmsg *);
static size_t (*z_msg_size)(const zmsg *);
static int (*z_msg_more)(const zmsg *);
static int (*z_errno)(void);
static void (*z_version)(int *, int *, int *);
static int z_bound = 0;

static PyObject *bind_zmq(PyObject *Py_UNUSED(self), PyObject *path) {
#if RECEIVE_AVAILABLE
    if (!PyUnicode_Check(path)) {
        PyErr_Format(PyExc_TypeError, "bind_zmq: expected a path (str), got %.100s",
                     Py_TYPE(path)->tp_name);
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(path);
    if (name == NULL) return NULL;
    int flags = RTLD_LAZY;
#ifdef RTLD_NOLOAD
    flags |= RTLD_NOLOAD; /* only a file already loaded (pyzmq's), never a new copy */
#endif
    void *lib = dlopen(name, flags);
    if (lib == NULL) Py_RETURN_NONE;
    /* All found first, then all set: a search that fails (another file, say) must leave the
     * functions of an earlier one as they were -- receive() may be using them. */
    void *found[8];
    static const char *const symbols[8] = {"zmq_msg_init", "zmq_msg_recv", "zmq_msg_close",
                                           "zmq_msg_data", "zmq_msg_size", "zmq_msg_more",
                                           "zmq_errno",    "zmq_version"};
    for (int i = 0; i < 8; i++) {
        found[i] = dlsym(lib, symbols[i]);
        if (found[i] == NULL) {
            dlclose(lib);
            Py_RETURN_NONE;
        }
    }
    *(void **)(&z_msg_init) = found[0];
    *(void **)(&z_msg_recv) = found[1];
    *(void **)(&z_msg_close) = found[2];
    *(void **)(&z_msg_data) = found[3];
    *(void **)(&z_msg_size) = found[4];
    *(void **)(&z_msg_more) = found[5];
    *(void **)(&z_errno) = found[6];
    *(void **)(&z_version) = found[7];
    /* The handle stays open: the functions are used for the life of the process. */
    int major = 0, minor = 0, patch = 0;
    z_version(&major, &minor, &patch);
    z_bound = 1;
    return Py_BuildValue("(iii)", major, minor, patch);
#else
    (void)path;
    Py_RETURN_NONE;
#endif
}

#if RECEIVE_AVAILABLE
/* One frame as bytes, *more set; NULL with *err = libzmq's errno (no Python error), or NULL
 * with a Python error set and *err = -1. */
static PyObject *receive_frame(void *sock, int *more, int *err) {
    zmsg m;
    z_msg_init(&m);
    if (z_msg_recv(&m, sock, Z_DONTWAIT) < 0) {
        *err = z_errno();
        z_msg_close(&m);
        return NULL;
    }
    PyObject *frame =
        PyBytes_FromStringAndSize((const char *)z_msg_data(&m), (Py_ssize_t)z_msg_size(&m));
    *more = z_msg_more(&m);
    z_msg_close(&m);
    if (frame == NULL) *err = -1;
    return frame;
}
#endif

#if RECEIVE_AVAILABLE
/* The socket's libzmq handle now; NULL with *err = ENOTSOCK once it is closed, or NULL with a
 * Python error set and *err = -1. */
static void *live_handle(PyObject *sock, int *err) {
    PyObject *value = PyObject_GetAttr(sock, s_underlying);
    if (value == NULL) {
        *err = -1;
        return NULL;
    }
    void *handle = PyLong_AsVoidPtr(value);
    Py_DECREF(value);
    if (handle == NULL) *err = PyErr_Occurred() ? -1 : ENOTSOCK;
    return handle;
}
#endif

static PyObject *receive(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 3, "receive(sock, limit, multipart)") < 0) return NULL;
#if RECEIVE_AVAILABLE
    if (!z_bound) {
        PyErr_SetString(PyExc_RuntimeError, "receive: bind_zmq() has not found libzmq");
        return NULL;
    }
    PyObject *owner = args[0];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    int multipart = PyObject_IsTrue(args[2]);
    if (multipart < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    int err = 0;
    void *sock = NULL; /* read (again) before a receive; NULL: Python code may have run */
    for (Py_ssize_t i = 0; i < limit; i++) {
        if (sock == NULL && (sock = live_handle(owner, &err)) == NULL) break;
        int more = 0;
        PyObject *first = receive_frame(sock, &more, &err);
        if (first == NULL) break;
        PyObject *msg = first;
        if (more || multipart) {
            msg = PyList_New(1);
            sock = NULL; /* a list: a collection may have run, and another thread */
            if (msg == NULL) {
                Py_DECREF(first);
                err = -1;
                break;
            }
            PyList_SET_ITEM(msg, 0, first);
            while (more) { /* a multipart message is atomic: its frames are all there */
                if (sock == NULL && (sock = live_handle(owner, &err)) == NULL) break;
                /* The rest of a message is there: an interrupted call is made again (a take
                 * that ended here would leave the next one starting in the middle of it). */
                PyObject *frame;
                int tries = 0;
                do {
                    err = 0;
                    frame = receive_frame(sock, &more, &err);
                } while (frame == NULL && err == EINTR && ++tries < 100);
                if (frame == NULL || PyList_Append(msg, frame) < 0) {
                    Py_XDECREF(frame);
                    if (err == 0) err = -1;
                    break;
                }
                Py_DECREF(frame);
            }
            if (err != 0) { /* the message cannot be had whole: it is not handed over */
                Py_DECREF(msg);
                break;
            }
        }
        if (PyList_Append(out, msg) < 0) {
            Py_DECREF(msg);
            err = -1;
            break;
        }
        Py_DECREF(msg);
    }
    if (err == -1) { /* a Python error (memory): what was taken is lost with it */
        Py_DECREF(out);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(Ni)", out, err);
    return result;
#else
    (void)args;
    PyErr_SetString(PyExc_RuntimeError, "receive: not available on this platform");
    return NULL;
#endif
}

#endif /* PERSIZMQ_SPEEDUPS_RECEIVE_H */
