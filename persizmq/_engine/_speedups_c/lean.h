/* persizmq._engine._speedups, part: the lean paths (add, front, try_front, pop) (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_LEAN_H
#define PERSIZMQ_SPEEDUPS_LEAN_H

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
    if (check_nargs(nargs, 3, "add(queue, msg, limit)") < 0) return NULL;
    PyObject *queue = args[0], *msg = args[1];
    if (!PyBytes_Check(msg)) Py_RETURN_FALSE;
    long long limit = PyLong_AsLongLong(args[2]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    PyObject *lock = lock_queue(queue, 1);
    if (lock == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_FALSE;
    }
    int r = add_locked(queue, msg, limit);
    if (unlock_queue(lock) < 0 || r < 0) return NULL;
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
    if (check_nargs(nargs, 2, "front(queue, held)") < 0) return NULL;
    PyObject *lock = lock_queue(args[0], 1);
    if (lock == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *result = front_locked(args[0], args[1]);
    if (unlock_queue(lock) < 0) {
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

/* try_front(queue, held): (True, message) from the run read ahead; (False, None) when the lock
 * is busy; None when the general path must answer. */
static PyObject *lean_try_front(PyObject *Py_UNUSED(self), PyObject *const *args,
                                Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "try_front(queue, held)") < 0) return NULL;
    PyObject *lock = lock_queue(args[0], 0);
    if (lock == NULL) {
        if (PyErr_Occurred()) return NULL;
        return Py_BuildValue("(OO)", Py_False, Py_None);
    }
    PyObject *msg = front_locked(args[0], args[1]);
    if (unlock_queue(lock) < 0 || msg == NULL) {
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
    if (check_nargs(nargs, 2, "pop(queue, held)") < 0) return NULL;
    PyObject *lock = lock_queue(args[0], 1);
    if (lock == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_FALSE;
    }
    int r = pop_locked(args[0], args[1]);
    if (unlock_queue(lock) < 0 || r < 0) return NULL;
    return PyBool_FromLong(r);
}

#endif /* PERSIZMQ_SPEEDUPS_LEAN_H */
