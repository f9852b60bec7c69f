/* persizmq._engine._speedups, part: run_uninterrupted (included once by _speedups.c;
 * see the theory of operation there). */

#ifndef PERSIZMQ_SPEEDUPS_UNINTERRUPTED_H
#define PERSIZMQ_SPEEDUPS_UNINTERRUPTED_H

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

#endif /* PERSIZMQ_SPEEDUPS_UNINTERRUPTED_H */
