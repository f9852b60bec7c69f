/* persizmq._engine._speedups, part: attribute access through slots, and the queue's lock (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_FIELDS_H
#define PERSIZMQ_SPEEDUPS_FIELDS_H

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
static Field F_w_meta = {&s_meta, NULL, 0};
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

/* Take the queue's lock (``blocking`` 0: only if it is free). Returns the lock, taken (a new
 * reference); NULL with an exception set on an error, NULL without one when it was not taken. */
static PyObject *lock_queue(PyObject *queue, int blocking) {
    PyObject *lock = fget(queue, &F_q_lock);
    if (lock == NULL) return NULL;
    int got = take(lock, blocking);
    if (got <= 0) {
        Py_DECREF(lock);
        return NULL;
    }
    return lock;
}

/* Release the lock that lock_queue took and drop the reference: 0, or -1 if the release failed
 * (an exception already set is kept). */
static int unlock_queue(PyObject *lock) {
    int released = give_back(lock);
    Py_DECREF(lock);
    return released;
}

/* 0 if a METH_FASTCALL function got ``want`` arguments, else -1 with a TypeError naming it. */
static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *signature) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", signature, want, nargs);
    return -1;
}

#endif /* PERSIZMQ_SPEEDUPS_FIELDS_H */
