/* The reading thread of race-checked memory reads, without the GIL (see
 * supervisor/memory.py: ReadPool and its pure-Python twin _PyCore, which stays the
 * reference; supervisor/accel.py loads this module).
 *
 * A Core is what ReadPool's rules (one FIFO, one active thread, retiring a slow read's
 * thread, the EAGAIN bound, the inline wait, the slots of the sessions) are applied to:
 * a queue of reads, the active thread that takes them off it one after another, the
 * reads done, and the eventfd that tells the event loop some are. A read of a target's
 * memory is done here from start to end without the GIL: process_vm_readv (or pread of
 * an open /proc/<tid>/mem) page by page, to the NUL for a string; a job may be several
 * strings of one task (the paths a handler declared: TargetMemory.read_cstrings_soon).
 * The Python thread it replaces took the GIL for every job and around every page, and
 * each time the event loop released the GIL (every ioctl, every epoll_wait) the two
 * traded it.
 *
 * Only a job that is a Python callable (`work`, used by tests to stand in for slow
 * memory) takes the GIL, to call it. ID_VALID stays with the caller (TargetMemory checks
 * it on the loop's thread after the read, with the notify fd it owns). Results are
 * turned into Python objects on the loop's thread (take_done, wait), by memory._convert.
 *
 * Locking: every field of struct core and of the jobs in its lists is under core->mu,
 * but the read itself (the job's pieces and result) which only its thread touches while
 * it is RUNNING. Python objects (token, work, value) are touched with the GIL only. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Where a job is. */
enum { QUEUED, RUNNING, DONE };
/* What a job or one of its strings got (memory.py's _convert turns it into an outcome;
 * keep in step with its _RES_* names). RES_NULL: a NULL pointer, not read. */
enum { RES_OK, RES_UNMAPPED, RES_NO_NUL, RES_OSERROR, RES_NOMEM, RES_PY_VALUE,
       RES_PY_ERROR, RES_NULL };

struct piece {        /* one buffer or string of a job */
    uint64_t address;
    int status;       /* RES_OK, RES_UNMAPPED, RES_NO_NUL, RES_NULL */
    char *data;       /* RES_OK: `size` bytes (malloc'd) */
    size_t size;
};

struct job {
    struct job *next;
    PyObject *token;  /* the Python _Job (owned), given back with the result */
    PyObject *work;   /* a callable to run with the GIL, or NULL: a read of memory */
    pid_t tid;
    int mem_fd;       /* >= 0: pread this /proc/<tid>/mem (owned: closed after the read) */
    size_t length;    /* bytes to read; for a string the limit, its NUL counted */
    int cstring;
    int several;      /* the result is a list, one item per piece (else the one piece) */
    size_t count;     /* pieces: 1 unless several */
    struct piece *pieces;  /* `one`, or `count` of them (malloc'd) */
    struct piece one;
    int state;
    int waited;       /* the loop's thread waits for it (Core.wait): not reported */
    int status, err;  /* RES_OK (see the pieces), RES_OSERROR, RES_NOMEM, RES_PY_* */
    PyObject *value;  /* RES_PY_*: the callable's result or exception (owned) */
};

struct thread {
    struct core *core;
    int retired;            /* takes no more jobs; ends after its current one */
    struct job *current;
    struct timespec started;
};

struct core {
    pthread_mutex_t mu;
    pthread_cond_t work;      /* the active thread waits for jobs here */
    pthread_cond_t finished;  /* Core.wait waits for its job here */
    struct job *head, *tail;  /* queued, first come first served */
    struct job *done_head, *done_tail;
    size_t pending, done;
    struct job *waited;       /* the job Core.wait is for (one at a time: the loop) */
    struct thread *active;
    int refs;                 /* the Python object and every thread alive */
    int efd;
    int signalled;            /* the eventfd was written since take_done last drained */
    int writers;              /* threads writing the eventfd without the lock */
    int closed;
    int nice;
};

static long page_size;

static void job_free(struct job *j)
{
    /* With the GIL. */
    Py_XDECREF(j->token);
    Py_XDECREF(j->work);
    Py_XDECREF(j->value);
    if (j->pieces != NULL) {
        for (size_t i = 0; i < j->count; i++)
            free(j->pieces[i].data);
        if (j->pieces != &j->one)
            free(j->pieces);
    }
    free(j);
}

static void core_release(struct core *c)
{
    /* Under c->mu, which it unlocks; frees the core when this was the last reference. */
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (last) {
        pthread_cond_destroy(&c->work);
        pthread_cond_destroy(&c->finished);
        pthread_mutex_destroy(&c->mu);
        free(c);
    }
}

/* ---- the read (memory.py's _Reader.read, read_exact and read_cstring) ---- */

static ssize_t read_chunk(struct job *j, uint64_t at, char *dst, size_t len)
{
    /* Up to `len` bytes, within one page; 0 at an unreadable page, -errno on error. */
    ssize_t n;
    if (j->mem_fd >= 0) {
        /* pread's offset is an off_t: from 2^63 up (kernel addresses on x86-64, which
         * the kernel's own access to the pointer faults on) it would be negative and
         * pread say EINVAL. Unreadable, as for process_vm_readv. */
        if (at > (uint64_t)INT64_MAX)
            return 0;
        do
            n = pread(j->mem_fd, dst, len, (off_t)at);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return (errno == EIO || errno == EFAULT) ? 0 : -errno;
        return n;
    }
    struct iovec local = {dst, len};
    struct iovec remote = {(void *)(uintptr_t)at, len};
    /* Faults like the kernel: EFAULT if the first page is unmapped, short at a mapping's
     * end. May sleep as long as a userfaultfd or FUSE page takes (why this is a thread). */
    n = process_vm_readv(j->tid, &local, 1, &remote, 1, 0);
    if (n < 0)
        return errno == EFAULT ? 0 : -errno;
    return n;
}

static int read_piece(struct job *j, struct piece *p)
{
    /* p's bytes (memory.py's _Reader.read_exact or read_cstring): 0 with p->status set,
     * or -1 when the whole job fails (j->status: an OSError of the read, no memory), as
     * the Python reader's exception leaves its job's loop over the strings.
     *
     * An exact read's length is <= 16 MiB (TargetMemory checks): its buffer is taken
     * whole. A string's length is only its limit, any size a policy chose (up to
     * PY_SSIZE_T_MAX here, far past any address space): its buffer grows with what was
     * read, doubling from a page, like the Python reader's bytearray. Either way it is
     * bounded by what Python let through and by readable memory, never by what the
     * target's memory holds. */
    if (p->address == 0) {
        p->status = RES_NULL;
        return 0;
    }
    size_t capacity = j->cstring && j->length > (size_t)page_size ? (size_t)page_size
                                                                  : j->length;
    char *buf = malloc(capacity ? capacity : 1);
    size_t got = 0;
    if (buf == NULL) {
        j->status = RES_NOMEM;
        return -1;
    }
    while (got < j->length) {
        uint64_t at = p->address + got;
        /* Page by page, so that one unmapped page does not hide a readable one. */
        size_t chunk = j->length - got, room = page_size - at % page_size;
        if (chunk > room)
            chunk = room;
        if (chunk > capacity - got) {  /* a string longer than its buffer: grow it */
            size_t grown = capacity > j->length / 2 ? j->length : capacity * 2;
            if (grown - got < chunk)  /* (capacity >= a page: one doubling holds a page) */
                grown = got + chunk;
            char *bigger = realloc(buf, grown);
            if (bigger == NULL) {
                free(buf);
                j->status = RES_NOMEM;
                return -1;
            }
            buf = bigger;
            capacity = grown;
        }
        ssize_t n = read_chunk(j, at, buf + got, chunk);
        if (n < 0) {
            free(buf);
            j->status = RES_OSERROR;
            j->err = (int)-n;
            return -1;
        }
        if (j->cstring) {
            char *nul = memchr(buf + got, 0, (size_t)n);
            if (nul != NULL) {
                p->size = (size_t)(nul - buf);
                p->status = RES_OK;
                p->data = buf;
                return 0;
            }
        }
        got += (size_t)n;
        if ((size_t)n < chunk) {
            free(buf);
            p->status = RES_UNMAPPED;
            return 0;
        }
    }
    if (j->cstring) {
        free(buf);
        p->status = RES_NO_NUL;
        return 0;
    }
    p->status = RES_OK;
    p->data = buf;
    p->size = got;
    return 0;
}

static void read_memory(struct job *j)
{
    /* Every piece of `j`, in order, until one fails the whole job; then the fd is closed
     * (the Python reader's close in its job's `finally`). */
    j->status = RES_OK;
    for (size_t i = 0; i < j->count; i++)
        if (read_piece(j, &j->pieces[i]) < 0)
            break;
    if (j->mem_fd >= 0) {
        close(j->mem_fd);
        j->mem_fd = -1;
    }
}

static void run_callable(struct job *j)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallNoArgs(j->work);
    if (result != NULL) {
        j->status = RES_PY_VALUE;
        j->value = result;
    } else {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL && value != NULL)
            PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        j->status = RES_PY_ERROR;
        j->value = value;
    }
    PyGILState_Release(gil);
}

/* ---- the thread (memory.py's _ReaderThread._main) ---- */

static int queue_done(struct core *c, struct job *j)
{
    /* Under c->mu: `j` is done, nobody waits for it synchronously, the pool is open.
     * 1 if the eventfd must be written (one write per batch). */
    j->next = NULL;
    if (c->done_tail)
        c->done_tail->next = j;
    else
        c->done_head = j;
    c->done_tail = j;
    c->done++;
    if (c->signalled)
        return 0;
    c->signalled = 1;
    return 1;
}

static void signal_done(int efd)
{
    uint64_t one = 1;
    if (write(efd, &one, sizeof one) < 0) {
        /* EAGAIN only at a counter of 2^64-2: then it is readable anyway. */
    }
}

static void finish(struct core *c, struct job *j)
{
    /* Under c->mu, on the loop's thread: queue_done, and the eventfd written. */
    if (queue_done(c, j))
        signal_done(c->efd);
}

static void *thread_main(void *arg)
{
    struct thread *t = arg;
    struct core *c = t->core;
    /* On Linux this changes the calling thread only (see memory.READER_NICE). */
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), c->nice) < 0) {
        /* only speed is at stake */
    }
    pthread_mutex_lock(&c->mu);
    while (!t->retired) {
        struct job *j = c->head;
        if (j == NULL) {
            pthread_cond_wait(&c->work, &c->mu);
            continue;
        }
        c->head = j->next;
        if (c->head == NULL)
            c->tail = NULL;
        c->pending--;
        j->state = RUNNING;
        t->current = j;
        clock_gettime(CLOCK_MONOTONIC, &t->started);
        pthread_mutex_unlock(&c->mu);
        if (j->work != NULL)
            run_callable(j);
        else
            read_memory(j);
        pthread_mutex_lock(&c->mu);
        t->current = NULL;
        j->state = DONE;
        /* Whom this wakes is the loop's thread, which then takes c->mu: it is woken with
         * the lock released. Woken under it, it could preempt this (niced) thread on its
         * CPU and then wait for the lock until the scheduler runs this thread again. */
        if (j->waited) {
            pthread_mutex_unlock(&c->mu);
            pthread_cond_broadcast(&c->finished);  /* Core.wait takes it */
            pthread_mutex_lock(&c->mu);
        } else if (c->closed) {
            /* The pool ended (its trio run did): nobody takes the result. Freeing its
             * Python objects needs the GIL (not the lock: whoever holds the GIL may
             * wait for it): only here, after the pool's end, does a read take it. */
            pthread_mutex_unlock(&c->mu);
            PyGILState_STATE gil = PyGILState_Ensure();
            job_free(j);
            PyGILState_Release(gil);
            pthread_mutex_lock(&c->mu);
        } else if (queue_done(c, j)) {
            /* (close_core leaves the eventfd open while a thread writes it: the last
             * writer closes it) */
            int efd = c->efd;
            c->writers++;
            pthread_mutex_unlock(&c->mu);
            signal_done(efd);
            pthread_mutex_lock(&c->mu);
            if (--c->writers == 0 && c->closed && c->efd >= 0) {
                close(c->efd);
                c->efd = -1;
            }
        }
    }
    if (c->active == t)
        c->active = NULL;
    free(t);
    core_release(c);
    return NULL;
}

static int start_thread(struct core *c)
{
    /* Under c->mu: a new active thread; -errno when none can be started. */
    struct thread *t = calloc(1, sizeof *t);
    pthread_attr_t attr;
    pthread_t id;
    int err;
    if (t == NULL)
        return -ENOMEM;
    t->core = c;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* A thread stuck in a read keeps its stack: 256 KiB, not the default 8 MiB (a
     * callable job runs Python in it; tests' callables are shallow). */
    pthread_attr_setstacksize(&attr, 256 * 1024);
    err = pthread_create(&id, &attr, thread_main, t);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        free(t);
        return -err;
    }
    c->refs++;
    c->active = t;
    return 0;
}

/* ---- the Python type ---- */

typedef struct {
    PyObject_HEAD
    struct core *core;
    PyObject *convert;  /* convert(token, status, err, payload): sets token.outcome */
} CoreObject;

static PyObject *thread_error(int err)
{
    /* What threading.Thread.start raises (memory.py catches RuntimeError). */
    PyErr_Format(PyExc_RuntimeError, "can't start new thread: %s", strerror(err));
    return NULL;
}

static int set_outcome(CoreObject *self, struct job *j)
{
    /* With the GIL: memory._convert(token, status, err, payload) sets the token's
     * outcome; 0, or -1 with an exception. Frees nothing. */
    PyObject *payload;
    int status = j->status;
    if (status == RES_OK && !j->several) {
        struct piece *p = &j->pieces[0];
        status = p->status;
        payload = status == RES_OK ? PyBytes_FromStringAndSize(p->data, (Py_ssize_t)p->size)
                                   : Py_NewRef(Py_None);
    } else if (status == RES_OK) {  /* one item per piece: bytes, or its status */
        payload = PyList_New((Py_ssize_t)j->count);
        for (size_t i = 0; payload != NULL && i < j->count; i++) {
            struct piece *p = &j->pieces[i];
            PyObject *item = p->status == RES_OK
                ? PyBytes_FromStringAndSize(p->data, (Py_ssize_t)p->size)
                : PyLong_FromLong(p->status);
            if (item == NULL)
                Py_CLEAR(payload);
            else
                PyList_SET_ITEM(payload, (Py_ssize_t)i, item);
        }
    } else if (j->value != NULL) {
        payload = Py_NewRef(j->value);
    } else {
        payload = Py_NewRef(Py_None);
    }
    if (payload == NULL)
        return -1;
    PyObject *r = PyObject_CallFunction(self->convert, "OiiO", j->token, status, j->err,
                                        payload);
    Py_DECREF(payload);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static void set_outcome_anyway(CoreObject *self, struct job *j)
{
    /* With the GIL, for take_done: an outcome is set whatever happens (its slot is given
     * back and its task woken by it): if the result cannot be made (no memory), the
     * outcome is a MemoryError; if not even that, the delivery makes one. */
    if (set_outcome(self, j) == 0)
        return;
    PyErr_Clear();
    j->status = RES_NOMEM;
    Py_CLEAR(j->value);
    if (set_outcome(self, j) < 0)
        PyErr_Clear();
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"nice", "convert", NULL};
    int nice;
    PyObject *convert;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO:Core", names, &nice, &convert))
        return NULL;
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    struct core *c = calloc(1, sizeof *c);
    if (c == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->efd < 0) {
        free(c);
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);  /* Core.wait's deadline */
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->finished, &attr);
    pthread_condattr_destroy(&attr);
    c->refs = 1;
    c->nice = nice;
    self->core = c;
    self->convert = Py_NewRef(convert);
    return (PyObject *)self;
}

static void close_core(struct core *c)
{
    /* With the GIL: frees the queued and done jobs, retires the active thread, closes
     * the eventfd (the caller told trio first). Jobs running stay with their threads. */
    pthread_mutex_lock(&c->mu);
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    c->closed = 1;
    struct job *queued = c->head, *done = c->done_head;
    c->head = c->tail = c->done_head = c->done_tail = NULL;
    c->pending = c->done = 0;
    if (c->active != NULL) {
        c->active->retired = 1;
        c->active = NULL;
    }
    pthread_cond_broadcast(&c->work);
    if (c->writers == 0) {  /* (else the last writer closes it) */
        close(c->efd);
        c->efd = -1;
    }
    pthread_mutex_unlock(&c->mu);
    /* A queued job's /proc mem fd was the caller's to close (its discard); the Python
     * side dropped those jobs already when its tasks were cancelled. */
    while (queued != NULL) {
        struct job *next = queued->next;
        queued->mem_fd = -1;
        job_free(queued);
        queued = next;
    }
    while (done != NULL) {
        struct job *next = done->next;
        job_free(done);
        done = next;
    }
}

static void Core_dealloc(CoreObject *self)
{
    struct core *c = self->core;
    if (c != NULL) {
        close_core(c);
        pthread_mutex_lock(&c->mu);
        core_release(c);
    }
    Py_XDECREF(self->convert);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int address_of(PyObject *value, uint64_t *address)
{
    /* A Python int that fits 64 bits (an address a register or a policy gave). */
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *address = (uint64_t)v;
    return 0;
}

static PyObject *Core_push(CoreObject *self, PyObject *args)
{
    /* Queue a job: `work` called (with the GIL), or, when it is None, the read of
     * `addresses` (an int, or a tuple of ints: several strings of one task, the result a
     * list) in `tid`'s memory, through `mem_fd` if >= 0 (taken: closed after the read;
     * left to the caller when this raises). RuntimeError: no thread could be started. */
    PyObject *token, *work, *addresses;
    int tid, mem_fd, cstring, waited;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "OOiiOnpp:push", &token, &work, &tid, &mem_fd, &addresses,
                          &length, &cstring, &waited))
        return NULL;
    if (length < 0)
        return PyErr_Format(PyExc_ValueError, "read length %zd", length);
    int several = PyTuple_Check(addresses);
    Py_ssize_t count = several ? PyTuple_GET_SIZE(addresses) : 1;
    struct job *j = calloc(1, sizeof *j);
    if (j == NULL)
        return PyErr_NoMemory();
    j->pieces = several ? calloc(count ? (size_t)count : 1, sizeof *j->pieces) : &j->one;
    if (j->pieces == NULL) {
        free(j);
        return PyErr_NoMemory();
    }
    j->count = (size_t)count;
    j->several = several;
    j->token = Py_NewRef(token);
    j->work = work == Py_None ? NULL : Py_NewRef(work);
    j->tid = tid;
    j->mem_fd = -1;  /* (not taken until queued) */
    j->length = (size_t)length;
    j->cstring = cstring;
    j->waited = waited;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = several ? PyTuple_GET_ITEM(addresses, i) : addresses;
        if (address_of(item, &j->pieces[i].address) < 0) {
            job_free(j);
            return NULL;
        }
    }
    struct core *c = self->core;
    pthread_mutex_lock(&c->mu);
    if (c->closed || (waited && c->waited != NULL)) {
        int closed = c->closed;
        pthread_mutex_unlock(&c->mu);
        if (closed)
            PyErr_SetString(PyExc_ValueError, "the reading pool is closed");
        else
            PyErr_SetString(PyExc_RuntimeError, "a synchronous wait is going on");
        job_free(j);
        return NULL;
    }
    if (c->active == NULL) {
        int err = start_thread(c);
        if (err < 0) {
            pthread_mutex_unlock(&c->mu);
            job_free(j);
            return thread_error(-err);
        }
    }
    j->mem_fd = mem_fd;
    if (c->tail)
        c->tail->next = j;
    else
        c->head = j;
    c->tail = j;
    c->pending++;
    if (waited)
        c->waited = j;
    pthread_mutex_unlock(&c->mu);
    /* After the unlock: the woken thread does not wait for our lock. Broadcast: a thread
     * retired while it waited for work must see it too (it ends). */
    pthread_cond_broadcast(&c->work);
    Py_RETURN_NONE;
}

static PyObject *Core_wait(CoreObject *self, PyObject *arg)
{
    /* Block (without the GIL) up to `timeout` seconds for the job pushed with waited:
     * True when it is done (its token's outcome set; not reported), False if not (its
     * thread reports it then, as when this raises). Signals wait too: the wait is
     * bounded by memory.INLINE_WAIT. */
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    struct core *c = self->core;
    struct job *j;
    int done;
    /* What threading.Lock.acquire says of a negative or NaN timeout (the Python core's
     * wait): ValueError, and the job is reported as when a wait times out. Let through,
     * it made an invalid deadline: pthread_cond_timedwait returned EINVAL at once,
     * holding the lock, and this loop spun with it while the job's thread waited for
     * it: the event loop hung. */
    int invalid = !(timeout >= 0.0);
    if (invalid)
        timeout = 0.0;
    else if (timeout > 1e9)  /* (no overflow of tv_sec; Core.wait's waits are ms) */
        timeout = 1e9;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    double whole = (double)(long)timeout;
    deadline.tv_sec += (time_t)whole;
    deadline.tv_nsec += (long)((timeout - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->mu);
    j = c->waited;
    while (j != NULL && j->state != DONE && !invalid)
        if (pthread_cond_timedwait(&c->finished, &c->mu, &deadline) != 0)
            break;  /* ETIMEDOUT (any error: never a loop that keeps the lock) */
    done = j != NULL && j->state == DONE;
    if (j != NULL && invalid && done)
        finish(c, j);  /* done already, and not taken here: reported like the others */
    else if (j != NULL && !done)
        j->waited = 0;  /* under the lock its thread reports it by: it will */
    c->waited = NULL;
    pthread_mutex_unlock(&c->mu);
    Py_END_ALLOW_THREADS
    if (j == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no job to wait for");
        return NULL;
    }
    if (invalid) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    if (!done)
        Py_RETURN_FALSE;
    if (set_outcome(self, j) < 0) {
        /* Reported like the others, then: take_done makes an outcome whatever happens. */
        pthread_mutex_lock(&c->mu);
        if (c->closed) {
            pthread_mutex_unlock(&c->mu);
            job_free(j);
        } else {
            finish(c, j);
            pthread_mutex_unlock(&c->mu);
        }
        return NULL;
    }
    job_free(j);
    Py_RETURN_TRUE;
}

static PyObject *Core_take_done(CoreObject *self, PyObject *unused)
{
    /* Every job done since the last call, as a list of their tokens, each with its
     * outcome set (call it after reading the eventfd). */
    struct core *c = self->core;
    pthread_mutex_lock(&c->mu);
    struct job *j = c->done_head, *last = c->done_tail;
    size_t count = c->done;
    c->done_head = c->done_tail = NULL;
    c->done = 0;
    c->signalled = 0;  /* after the caller's eventfd read: a job done now writes again */
    pthread_mutex_unlock(&c->mu);
    PyObject *list = PyList_New((Py_ssize_t)count);  /* (without the lock: it may run GC) */
    if (list == NULL) {
        /* Put back first, and signal again: the next round takes them. */
        pthread_mutex_lock(&c->mu);
        if (j != NULL && !c->closed) {
            last->next = c->done_head;
            c->done_head = j;
            if (c->done_tail == NULL)
                c->done_tail = last;
            c->done += count;
            j = NULL;
            uint64_t one = 1;
            c->signalled = 1;
            if (write(c->efd, &one, sizeof one) < 0) {
                /* (readable anyway) */
            }
        }
        pthread_mutex_unlock(&c->mu);
        while (j != NULL) {  /* (closed meanwhile: nobody takes them) */
            struct job *next = j->next;
            job_free(j);
            j = next;
        }
        return NULL;
    }
    for (size_t i = 0; j != NULL; i++) {
        struct job *next = j->next;
        set_outcome_anyway(self, j);
        PyList_SET_ITEM(list, (Py_ssize_t)i, Py_NewRef(j->token));
        job_free(j);
        j = next;
    }
    return list;
}

static PyObject *Core_cancel(CoreObject *self, PyObject *token)
{
    /* Take `token`'s job off the queue: True, or False when a thread has it. */
    struct core *c = self->core;
    struct job *prev = NULL, *j;
    pthread_mutex_lock(&c->mu);
    for (j = c->head; j != NULL; prev = j, j = j->next)
        if (j->token == token)
            break;
    if (j != NULL) {
        if (prev)
            prev->next = j->next;
        else
            c->head = j->next;
        if (c->tail == j)
            c->tail = prev;
        c->pending--;
    }
    pthread_mutex_unlock(&c->mu);
    if (j == NULL)
        Py_RETURN_FALSE;
    j->mem_fd = -1;  /* not read: the caller's discard closes it */
    job_free(j);
    Py_RETURN_TRUE;
}

static PyObject *Core_pop_pending(CoreObject *self, PyObject *unused)
{
    /* The first queued job's token (taken off the queue), or None. */
    struct core *c = self->core;
    pthread_mutex_lock(&c->mu);
    struct job *j = c->head;
    if (j != NULL) {
        c->head = j->next;
        if (c->head == NULL)
            c->tail = NULL;
        c->pending--;
    }
    pthread_mutex_unlock(&c->mu);
    if (j == NULL)
        Py_RETURN_NONE;
    PyObject *token = Py_NewRef(j->token);
    j->mem_fd = -1;  /* (as in cancel) */
    job_free(j);
    return token;
}

static PyObject *Core_active(CoreObject *self, PyObject *unused)
{
    /* (token, seconds) of the active thread's read, or (None, 0.0). */
    struct core *c = self->core;
    PyObject *token = Py_None;
    double elapsed = 0.0;
    pthread_mutex_lock(&c->mu);
    if (c->active != NULL && c->active->current != NULL) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        token = c->active->current->token;
        elapsed = (double)(now.tv_sec - c->active->started.tv_sec)
                  + (double)(now.tv_nsec - c->active->started.tv_nsec) / 1e9;
    }
    Py_INCREF(token);  /* with the GIL, the lock held: the job cannot be freed meanwhile */
    pthread_mutex_unlock(&c->mu);
    return Py_BuildValue("(Nd)", token, elapsed);
}

static PyObject *Core_retire(CoreObject *self, PyObject *token)
{
    /* If the active thread still reads `token`'s job and reads wait: a new thread takes
     * the queue over, the old one ends after that read. True if so. */
    struct core *c = self->core;
    struct thread *old;
    pthread_mutex_lock(&c->mu);
    old = c->active;
    if (c->closed || old == NULL || old->current == NULL || old->current->token != token
            || c->head == NULL) {
        pthread_mutex_unlock(&c->mu);
        Py_RETURN_FALSE;
    }
    int err = start_thread(c);  /* before retiring: it may fail */
    if (err < 0) {
        c->active = old;
        pthread_mutex_unlock(&c->mu);
        return thread_error(-err);
    }
    old->retired = 1;
    pthread_mutex_unlock(&c->mu);
    Py_RETURN_TRUE;
}

static PyObject *Core_fileno(CoreObject *self, PyObject *unused)
{
    return PyLong_FromLong(self->core->efd);
}

static PyObject *Core_queued(CoreObject *self, PyObject *unused)
{
    /* The tokens of the jobs queued, first first (statistics, tests). */
    struct core *c = self->core;
    pthread_mutex_lock(&c->mu);
    size_t count = c->pending, n = 0;
    PyObject **tokens = malloc((count ? count : 1) * sizeof *tokens);
    for (struct job *j = c->head; tokens != NULL && j != NULL && n < count; j = j->next)
        tokens[n++] = Py_NewRef(j->token);  /* (no allocation under the lock) */
    pthread_mutex_unlock(&c->mu);
    if (tokens == NULL)
        return PyErr_NoMemory();
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; i < n; i++) {
        if (list != NULL)
            PyList_SET_ITEM(list, (Py_ssize_t)i, tokens[i]);
        else
            Py_DECREF(tokens[i]);
    }
    free(tokens);
    return list;
}

static PyObject *Core_counts(CoreObject *self, PyObject *unused)
{
    /* (queued, done and not taken) */
    struct core *c = self->core;
    pthread_mutex_lock(&c->mu);
    size_t pending = c->pending, done = c->done;
    pthread_mutex_unlock(&c->mu);
    return Py_BuildValue("(nn)", (Py_ssize_t)pending, (Py_ssize_t)done);
}

static PyObject *Core_close(CoreObject *self, PyObject *unused)
{
    close_core(self->core);
    Py_RETURN_NONE;
}

static PyMethodDef Core_methods[] = {
    {"push", (PyCFunction)Core_push, METH_VARARGS,
     "push(token, work, tid, mem_fd, address or (address, ...), length, cstring, waited)"},
    {"wait", (PyCFunction)Core_wait, METH_O, "wait(timeout) -> bool"},
    {"take_done", (PyCFunction)Core_take_done, METH_NOARGS, "[token]"},
    {"cancel", (PyCFunction)Core_cancel, METH_O, "cancel(token) -> bool"},
    {"pop_pending", (PyCFunction)Core_pop_pending, METH_NOARGS, "token | None"},
    {"active", (PyCFunction)Core_active, METH_NOARGS, "(token | None, seconds)"},
    {"retire", (PyCFunction)Core_retire, METH_O, "retire(token) -> bool"},
    {"fileno", (PyCFunction)Core_fileno, METH_NOARGS, "the eventfd"},
    {"counts", (PyCFunction)Core_counts, METH_NOARGS, "(queued, done)"},
    {"queued", (PyCFunction)Core_queued, METH_NOARGS, "[token] of the jobs queued"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "end the pool"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._memread.Core",
    .tp_basicsize = sizeof(CoreObject),
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The queue, threads and eventfd of a ReadPool (see memory._PyCore).",
    .tp_methods = Core_methods,
    .tp_new = Core_new,
};

static struct PyModuleDef memread_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor._memread",
    .m_doc = "The GIL-free reading thread (optional; see supervisor/accel.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__memread(void)
{
    page_size = sysconf(_SC_PAGESIZE);
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&memread_module);
    if (m == NULL)
        return NULL;
    /* Bumped whenever the Python side must change with the C side (accel.py). */
    if (PyModule_AddIntConstant(m, "API_VERSION", 2) < 0
            || PyModule_AddType(m, &CoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
