/* The compiled hot loop of seccomp-supervisor (see setup.py and supervisor/accel.py).
 *
 * Everything here has a pure-Python twin that stays the reference: the tests run both.
 *
 * - poll_round()      is one round of notifyfd.Poller.run's inner loop (epoll.poll(0),
 *                     then reader.on_ready(mask) per event);
 * - session_ready()   is Session.on_ready for the common case only: RECV, journal, route,
 *                     the sync handlers of the route, SEND of a deny/returns Decision,
 *                     the session's counters, then Recorder.decided (Python). Anything
 *                     else is handed, at the point reached, to Session._decide_received,
 *                     so the C never has to be right about a rare case.
 * - resume()          is the same from a link whose declared paths were read (inline,
 *                     or delivered later by the read pool): its handler (a coroutine's
 *                     first step too), the later links, the answer; it is what
 *                     Session._decide_received(..., resumed=True) does in Python.
 * - Signal            is the flag between the event loop and the reading thread of
 *                     supervisor/memory.py (its twin: memory._PySignal); it releases the
 *                     GIL while it waits.
 * - ReadBatch         is what that reading thread reads in one go, without the GIL (its
 *                     twin: memory._PyReadBatch).
 * - InlineReader      is a thread of its own, never holding the GIL, for the reads the
 *                     loop waits for inline (its twin: the pool's own inline wait).
 *
 * Python keeps every object and all state: this code reads and writes the same
 * attributes the Python code does, so status, metrics, audit and journals cannot tell
 * which loop ran. Only the trio thread calls in here, but for Signal and ReadBatch; it
 * keeps the GIL throughout (RECV too, once the compiled watchdog, watch_recv, watches
 * its thread). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <limits.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>

/* Bumped whenever the Python side must change with the C side (accel.API_VERSION). */
#define HOTLOOP_API_VERSION 14

/* The journal's layout (supervisor/journal.py): a 64-byte header, then 96-byte slots
 * holding the struct seccomp_notif RECV filled and, at word 10, its commit word. */
#define JOURNAL_HEADER_SIZE 64
#define JOURNAL_SLOT_SIZE 96
/* Events per epoll round at most (Poller.MAX_EVENTS is 32): bounds the stack array. */
#define MAX_ROUND_EVENTS 256

/* The watchdog protocol of notifyfd._RecvWatch, for RECVs made here: incremented when a
 * RECV begins and when it ends, so odd while one runs. Written by the trio thread with
 * the GIL held; read without it by the compiled watchdog (watch_recv), and under it by
 * recv_calls(). */
static _Atomic unsigned long long recv_calls_count;
/* One more RECV begun or ended. Only the trio thread writes the count, so a relaxed load
 * and store are enough (plain moves on x86), where ++ on an atomic is a locked
 * read-modify-write, twice per notification; the watchdog only needs to see each value
 * whole. */
static inline void count_recv(void)
{
    atomic_store_explicit(&recv_calls_count,
                          atomic_load_explicit(&recv_calls_count, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}
/* RECVs the compiled watchdog interrupted (its SIGURGs). */
static _Atomic unsigned long long recv_interrupted_count;
/* Set once by watch_recv() (with the GIL): the thread whose RECVs the compiled watchdog
 * interrupts. Only that thread RECVs here with the GIL held (see session_ready). */
static int recv_watched;
static pthread_t recv_watched_thread;

/* Set by setup(): the classes the fast path recognises (exact types only: a subclass
 * may change anything, so it takes the Python path), and their slot descriptors. */
static PyTypeObject *session_type, *notification_type, *link_type, *decision_type;
static PyObject *outcome_type;
static PyTypeObject *recorder_type;
enum { N_ID, N_PID, N_NR, N_ARCH, N_SYSCALL, N_ARGS, N_CONTAINER, N_MEMORY, N_READ_MEMORY,
       N_PATHS, N_SLOTS };
static PyObject *notification_slots[N_SLOTS];
static PyObject *link_policy, *link_func, *link_is_async, *link_coroutine;
static PyObject *decision_kind, *decision_response;
static PyObject *outcome_decision, *outcome_policy, *outcome_error, *outcome_audit_hot;

/* Interned attribute and method names. */
static PyObject *s_notify, *s_fd, *s_buf, *s_journal, *s_routes, *s_bucket, *s_shadow,
    *s_stats, *s_recorder, *s_container, *s_memory, *s_last_outcome, *s_notifications,
    *s_gone, *s_decisions, *s_latency, *s_mm, *s_mask, *s_on_ready, *s_on_failure,
    *s_unregister, *s_read_elsewhere, *s_decide_received, *s_decided, *s_allow, *s_recv,
    *s_send, *s_last, *s_value, *s_bounds, *s_counts, *s_sum, *s_audit, *s_audit_slow,
    *s_none, *s_deny, *s_limiter, *s_limit, *s_epoch, *s_window, *s_written, *s_start,
    *s_suppressed, *s_suppressed_counter, *s_generation, *s_readers, *s_inflight,
    *s_max_inflight, *s_suspend;
static PyObject *one, *zero;
/* ("resumed",): the keyword of Session._decide_received for a decision handed over
 * before the handler of the link whose paths were just read. */
static PyObject *resumed_kwnames;

/* Where a member (slot) descriptor keeps its value in `obj`: for a plain object slot
 * (T_OBJECT_EX, writable, no audit hook) of a type `obj` is an instance of, the address
 * member_get and member_set (Objects/descrobject.c) read and write after their checks;
 * NULL for anything else. (Through the descriptor, a get or set was ~60 instructions
 * with its type check and PyMember_GetOne/SetOne; about 30 of them are made per
 * notification: bench/README.md, "Session 9".) */
static inline PyObject **slot_address(PyObject *descr, PyObject *obj)
{
    PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
    PyMemberDef *def = member->d_member;
    if (def->type != T_OBJECT_EX || def->flags != 0 ||
        !PyObject_TypeCheck(obj, PyDescr_TYPE(member)))
        return NULL;
    return (PyObject **)((char *)obj + def->offset);
}

/* A member (slot) descriptor's get and set: what attribute access does for a __slots__
 * attribute, without looking the name up in the type's MRO first. An empty slot, and
 * any other kind of member, take the descriptor (and its AttributeError). */
static inline PyObject *slot_get(PyObject *descr, PyObject *obj)
{
    PyObject **address = slot_address(descr, obj);
    if (address != NULL && *address != NULL) {
        Py_INCREF(*address);
        return *address;
    }
    return Py_TYPE(descr)->tp_descr_get(descr, obj, (PyObject *)Py_TYPE(obj));
}

static inline int slot_set(PyObject *descr, PyObject *obj, PyObject *value)
{
    PyObject **address = value != NULL ? slot_address(descr, obj) : NULL;
    if (address != NULL) {
        PyObject *old = *address;
        Py_INCREF(value);
        *address = value;
        Py_XDECREF(old);
        return 0;
    }
    return Py_TYPE(descr)->tp_descr_set(descr, obj, value);
}

static PyObject *member_descriptor(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);  /* borrowed */
    if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, name);
        return NULL;
    }
    Py_INCREF(descr);
    return descr;
}

/* A clock read as CPython turns it into a float (_PyTime_AsSecondsDouble), so the values
 * compare with Python's own readings to the last bit. */
static inline double clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    long long t = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    volatile double d;
    if (t % 1000000000LL == 0)
        d = (double)(t / 1000000000LL);
    else {
        d = (double)t;
        d /= 1e9;
    }
    return d;
}

/* time.perf_counter(): CLOCK_MONOTONIC on Linux (verified: time.get_clock_info). */
static inline double now(void)
{
    return clock_seconds(CLOCK_MONOTONIC);
}

/* Attribute access with a per-call-site cache of the member (slot) descriptor the
 * object's type has for the name: what PyObject_GenericGetAttr finds first for a
 * __slots__ attribute (a data descriptor wins over everything), read without the MRO
 * walk. Types with their own __getattribute__/__setattr__, and names that are no slot
 * (a plain instance attribute), take PyObject_GetAttr/SetAttr. The cache holds strong
 * references: the types are the package's classes, which live as long as the process. */
typedef struct {
    PyTypeObject *type;
    unsigned int version; /* type->tp_version_tag when looked up */
    PyObject *descr; /* the slot's descriptor; NULL: see in_dict */
    int in_dict;     /* no attribute of the type has the name: the instance dict's */
} AttrCache;

static PyObject *cached_member(PyObject *obj, PyObject *name, AttrCache *cache)
{
    PyTypeObject *type = Py_TYPE(obj);
    /* The version tag changes whenever the type or a base is changed (an attribute set
     * on the class at run time, a property added): what CPython's own attribute caches
     * check. Without a valid tag, nothing is cached. */
    if (cache->type != type || cache->version != type->tp_version_tag ||
        !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        PyObject *descr = NULL;
        int in_dict = 0;
        if (type->tp_getattro == PyObject_GenericGetAttr &&
            type->tp_setattro == PyObject_GenericSetAttr) {
            descr = _PyType_Lookup(type, name); /* borrowed */
            in_dict = descr == NULL && type->tp_dictoffset != 0;
            if (descr != NULL && Py_TYPE(descr) != &PyMemberDescr_Type)
                descr = NULL;
        }
        Py_INCREF(type);
        Py_XINCREF(descr);
        Py_XSETREF(cache->type, type);
        Py_XSETREF(cache->descr, descr);
        cache->in_dict = in_dict;
        cache->version = type->tp_version_tag; /* (_PyType_Lookup assigned one) */
    }
    return cache->descr;
}

static inline PyObject *get_attr(PyObject *obj, PyObject *name, AttrCache *cache)
{
    PyObject *descr = cached_member(obj, name, cache);
    if (descr != NULL)
        return slot_get(descr, obj);
    if (cache->in_dict) {
        /* What PyObject_GenericGetAttr does when the type has nothing of that name.
         * (For a class with a managed dict, CPython 3.11 makes the dict object once.) */
        PyObject **dict = _PyObject_GetDictPtr(obj);
        if (dict != NULL && *dict != NULL) {
            PyObject *value = PyDict_GetItemWithError(*dict, name); /* borrowed */
            if (value != NULL) {
                Py_INCREF(value);
                return value;
            }
            if (PyErr_Occurred())
                return NULL;
        }
    }
    return PyObject_GetAttr(obj, name); /* and its AttributeError */
}

static inline int set_attr(PyObject *obj, PyObject *name, PyObject *value, AttrCache *cache)
{
    PyObject *descr = cached_member(obj, name, cache);
    return descr != NULL ? slot_set(descr, obj, value) : PyObject_SetAttr(obj, name, value);
}

/* GET(obj, name): get_attr with a cache of its own for this call site. */
#define GET(obj, name) ({ static AttrCache site_cache_; get_attr((obj), (name), &site_cache_); })
#define INCREMENT(obj, name) \
    ({ static AttrCache site_cache_; increment_attr((obj), (name), &site_cache_); })

/* value + 1, without the generic number protocol for an int that fits a long long. */
static inline PyObject *plus_one(PyObject *value)
{
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow && v < LLONG_MAX && !(v == -1 && PyErr_Occurred()))
            return PyLong_FromLongLong(v + 1);
        PyErr_Clear();
    }
    return PyNumber_Add(value, one);
}

/* obj.name += 1 for an int attribute. */
static int increment_attr(PyObject *obj, PyObject *name, AttrCache *cache)
{
    PyObject *value = get_attr(obj, name, cache);
    if (value == NULL)
        return -1;
    PyObject *sum = plus_one(value);
    Py_DECREF(value);
    if (sum == NULL)
        return -1;
    int rc = set_attr(obj, name, sum, cache);
    Py_DECREF(sum);
    return rc;
}

/* container[key] += 1 (dict.get(key, 0) + 1 for a dict). */
static int increment_item(PyObject *container, PyObject *key, int is_dict)
{
    PyObject *value;
    if (is_dict) {
        value = PyDict_GetItemWithError(container, key);  /* borrowed */
        if (value == NULL && PyErr_Occurred())
            return -1;
        if (value == NULL)
            return PyDict_SetItem(container, key, one);
        Py_INCREF(value);
    }
    else if (PyList_CheckExact(container) && PyLong_CheckExact(key)) {
        /* list[i] += 1 for an index in range (the bucket index of a latency). */
        Py_ssize_t i = PyLong_AsSsize_t(key);
        if (i < 0 || i >= PyList_GET_SIZE(container)) {
            if (i == -1 && PyErr_Occurred())
                return -1;
            goto generic;
        }
        value = PyList_GET_ITEM(container, i);
        Py_INCREF(value);
        PyObject *sum = plus_one(value);
        Py_DECREF(value);
        if (sum == NULL)
            return -1;
        PyList_SetItem(container, i, sum); /* steals sum, drops the old item */
        return 0;
    }
    else {
    generic:
        if ((value = PyObject_GetItem(container, key)) == NULL)
            return -1;
    }
    PyObject *sum = plus_one(value);
    Py_DECREF(value);
    if (sum == NULL)
        return -1;
    int rc = is_dict ? PyDict_SetItem(container, key, sum) : PyObject_SetItem(container, key, sum);
    Py_DECREF(sum);
    return rc;
}

/* session.stats.gone += 1; session.recorder.gone(stage): a call the kernel withdrew. */
static PyObject *count_gone(PyObject *session, PyObject *stage)
{
    PyObject *stats = GET(session, s_stats);
    if (stats == NULL)
        return NULL;
    int rc = INCREMENT(stats, s_gone);
    Py_DECREF(stats);
    if (rc < 0)
        return NULL;
    PyObject *recorder = GET(session, s_recorder);
    if (recorder == NULL)
        return NULL;
    PyObject *args[2] = {recorder, stage};
    PyObject *r = PyObject_VectorcallMethod(s_gone, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                            NULL);
    Py_DECREF(recorder);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

/* Journal.record(notif_id): copy the RECV buffer into ring slot id & mask, then write its
 * commit word. A SIGKILL may stop us between any two instructions and the recovery reads
 * the mapping as left: the commit must not be stored before the copy (release order). */
static int journal_record(PyObject *journal, const struct seccomp_notif *notif)
{
    PyObject *mask_obj = GET(journal, s_mask);
    if (mask_obj == NULL)
        return -1;
    unsigned long long mask = PyLong_AsUnsignedLongLong(mask_obj);
    Py_DECREF(mask_obj);
    if (mask == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    PyObject *mm = GET(journal, s_mm);
    if (mm == NULL)
        return -1;
    Py_buffer view;
    /* Taken and released per call: a held export would make Journal.close() fail. */
    int rc = PyObject_GetBuffer(mm, &view, PyBUF_WRITABLE);
    Py_DECREF(mm);
    if (rc < 0)
        return -1;
    size_t offset = JOURNAL_HEADER_SIZE + (size_t)(notif->id & mask) * JOURNAL_SLOT_SIZE;
    if (view.len < 0 || offset + JOURNAL_SLOT_SIZE > (size_t)view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "journal mapping too small for its ring");
        return -1;
    }
    char *slot = (char *)view.buf + offset;
    memcpy(slot, notif, sizeof(*notif));
    /* The commit word is 8-aligned: the mapping is page-aligned, offsets multiples of 8. */
    __atomic_store_n((uint64_t *)(slot + sizeof(*notif)), (uint64_t)notif->id,
                     __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    return 0;
}

/* What a fast answer needs of a handler's result: an exact Decision, not an allow, with
 * a (val, error, flags) response that fits the struct. Else 0: Python decides. */
static int fast_response(PyObject *result, struct seccomp_notif_resp *resp)
{
    if (Py_TYPE(result) != decision_type)
        return 0;
    PyObject *kind = slot_get(decision_kind, result);
    if (kind == NULL) {
        PyErr_Clear();
        return 0;
    }
    int allow = kind == s_allow || !PyUnicode_CheckExact(kind) ||
                PyUnicode_Compare(kind, s_allow) == 0;
    Py_DECREF(kind);
    if (allow)
        return 0;
    PyObject *response = slot_get(decision_response, result);
    if (response == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = 0;
    if (PyTuple_CheckExact(response) && PyTuple_GET_SIZE(response) == 3) {
        int overflow = 0;
        long long val = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(response, 0), &overflow);
        long long error = overflow ? 0 : PyLong_AsLongLongAndOverflow(
                                              PyTuple_GET_ITEM(response, 1), &overflow);
        long long flags = overflow ? 0 : PyLong_AsLongLongAndOverflow(
                                              PyTuple_GET_ITEM(response, 2), &overflow);
        if (PyErr_Occurred())
            PyErr_Clear();  /* not ints: Python's struct.pack says why */
        else if (!overflow && error >= INT32_MIN && error <= INT32_MAX && flags >= 0 &&
                 flags <= UINT32_MAX) {
            resp->val = val;
            resp->error = (int32_t)error;
            resp->flags = (uint32_t)flags;
            ok = 1;
        }
    }
    Py_DECREF(response);
    return ok;
}

/* obj.name = obj.name + amount for a float attribute (HistogramChild.sum). */
static int add_to_attr(PyObject *obj, PyObject *name, PyObject *amount)
{
    static AttrCache cache;
    PyObject *value = get_attr(obj, name, &cache);
    if (value == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(value, amount);
    Py_DECREF(value);
    if (sum == NULL)
        return -1;
    int rc = set_attr(obj, name, sum, &cache);
    Py_DECREF(sum);
    return rc;
}

/* PyObject_RichCompareBool(a, b, op) for op Py_GT or Py_GE, without the generic protocol
 * for two ints that fit a long long (the rate limit and a window's count). */
static inline int int_compare(PyObject *a, PyObject *b, int op)
{
    if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        int overflow_a, overflow_b;
        long long x = PyLong_AsLongLongAndOverflow(a, &overflow_a),
                  y = PyLong_AsLongLongAndOverflow(b, &overflow_b);
        if (!overflow_a && !overflow_b && !PyErr_Occurred())
            return op == Py_GT ? x > y : x >= y;
        PyErr_Clear();
    }
    return PyObject_RichCompareBool(a, b, op);
}

/* Is `value` == the str `literal` (interned)? */
static inline int str_equal(PyObject *value, PyObject *literal)
{
    return value == literal ||
           (PyUnicode_CheckExact(value) && PyUnicode_Compare(value, literal) == 0);
}

/* audit.Recorder.decided(container, id, tid, syscall, args, outcome, latency) for an
 * Outcome the hot loop made (shadow False), in its common case: the metrics children
 * of the pair cached in recorder._last, then the audit level's filter and the line held
 * back by the window its Outcome found (outcome.audit_hot). Past the audit filter it
 * calls Recorder._audit, and for anything else the Python method in full (before any
 * counter moved). Returns the bucket index (a new reference) or NULL. */
static PyObject *record_decided(PyObject *recorder, PyObject *container, PyObject *id,
                                PyObject *tid, PyObject *syscall, PyObject *args,
                                PyObject *outcome, PyObject *kind, double latency)
{
    PyObject *result = NULL, *latency_obj = NULL, *error = NULL, *last = NULL,
             *bounds = NULL, *counts = NULL, *bucket = NULL, *audit = NULL,
             *limiter = NULL, *limit = NULL, *hot = NULL, *epoch = NULL, *window = NULL,
             *written = NULL, *start = NULL, *counter = NULL, *now_obj = NULL;
    if ((latency_obj = PyFloat_FromDouble(latency)) == NULL)
        return NULL;
    if (Py_TYPE(recorder) != recorder_type || Py_TYPE(outcome) != (PyTypeObject *)outcome_type)
        goto python;
    if ((error = slot_get(outcome_error, outcome)) == NULL)
        goto done;
    if (error != Py_None)
        goto python;  /* handler_errors too: the Python method */
    if ((last = GET(recorder, s_last)) == NULL)
        goto done;
    if (!PyTuple_CheckExact(last) || PyTuple_GET_SIZE(last) != 6 ||
        PyTuple_GET_ITEM(last, 0) != syscall)
        goto python;
    if (PyTuple_GET_ITEM(last, 1) != outcome) {
        PyObject *policy = slot_get(outcome_policy, outcome);
        if (policy == NULL)
            goto done;
        Py_DECREF(policy);  /* compared by identity only */
        if (PyTuple_GET_ITEM(last, 2) != policy || PyTuple_GET_ITEM(last, 3) != kind)
            goto python;
    }
    PyObject *histogram = PyTuple_GET_ITEM(last, 5);
    if ((bounds = GET(histogram, s_bounds)) == NULL ||
        (counts = GET(histogram, s_counts)) == NULL)
        goto done;
    if (!PyTuple_CheckExact(bounds) || !PyList_CheckExact(counts) ||
        PyList_GET_SIZE(counts) != PyTuple_GET_SIZE(bounds) + 1)
        goto python;
    /* bisect_left(bounds, latency): the first bound >= latency (floats, sorted). */
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(bounds);
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        PyObject *bound = PyTuple_GET_ITEM(bounds, mid);
        if (!PyFloat_CheckExact(bound))
            goto python;
        if (PyFloat_AS_DOUBLE(bound) < latency)
            lo = mid + 1;
        else
            hi = mid;
    }
    if ((bucket = PyLong_FromSsize_t(lo)) == NULL)
        goto done;
    /* The bumps of the Python method, in its order. */
    if (INCREMENT(PyTuple_GET_ITEM(last, 4), s_value) < 0 ||
        increment_item(counts, bucket, 0) < 0 ||
        add_to_attr(histogram, s_sum, latency_obj) < 0)
        goto done;
    if ((audit = GET(recorder, s_audit)) == NULL)
        goto done;
    if (str_equal(audit, s_none) || (str_equal(audit, s_deny) && !str_equal(kind, s_deny)))
        goto bucket_only;
    double now = clock_seconds(CLOCK_REALTIME); /* time.time() */
    if ((limiter = GET(recorder, s_limiter)) == NULL ||
        (limit = GET(limiter, s_limit)) == NULL)
        goto done;
    int positive = int_compare(limit, zero, Py_GT);
    if (positive < 0)
        goto done;
    if (positive) {
        if ((hot = slot_get(outcome_audit_hot, outcome)) == NULL ||
            (epoch = GET(limiter, s_epoch)) == NULL)
            goto done;
        if (PyTuple_CheckExact(hot) && PyTuple_GET_SIZE(hot) >= 5 &&
            PyTuple_GET_ITEM(hot, 0) == epoch && PyTuple_GET_ITEM(hot, 1) == container &&
            PyTuple_GET_ITEM(hot, 2) == syscall && PyTuple_GET_ITEM(hot, 3) == Py_False) {
            PyObject *w = PyTuple_GET_ITEM(hot, 4);
            if ((written = GET(w, s_written)) == NULL ||
                (start = GET(w, s_start)) == NULL ||
                (window = GET(limiter, s_window)) == NULL)
                goto done;
            int full = int_compare(written, limit, Py_GE);
            if (full < 0)
                goto done;
            double start_d = PyFloat_AsDouble(start), window_d = PyFloat_AsDouble(window);
            if (PyErr_Occurred())
                goto done;
            /* A window starting after `now` has ended (a wall clock stepped back), as
             * in Recorder.decided. */
            if (full && now - start_d >= 0.0 && now - start_d < window_d) {
                if (INCREMENT(w, s_suppressed) < 0 ||
                    (counter = GET(recorder, s_suppressed_counter)) == NULL ||
                    (counter != Py_None && INCREMENT(counter, s_value) < 0))
                    goto done;
                goto bucket_only;
            }
        }
    }
    if ((now_obj = PyFloat_FromDouble(now)) == NULL)
        goto done;
    PyObject *call[11] = {recorder, container, id, tid, syscall, args, outcome, latency_obj,
                          Py_False, now_obj, bucket};
    result = PyObject_VectorcallMethod(s_audit_slow, call, 11 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                       NULL);
    goto done;
bucket_only:
    result = bucket;
    Py_INCREF(result);
    goto done;
python: {
        PyObject *call[8] = {recorder, container, id, tid, syscall, args, outcome,
                             latency_obj};
        result = PyObject_VectorcallMethod(s_decided, call, 8 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                           NULL);
    }
done:
    Py_XDECREF(now_obj);
    Py_XDECREF(counter);
    Py_XDECREF(start);
    Py_XDECREF(written);
    Py_XDECREF(window);
    Py_XDECREF(epoch);
    Py_XDECREF(hot);
    Py_XDECREF(limit);
    Py_XDECREF(limiter);
    Py_XDECREF(audit);
    Py_XDECREF(bucket);
    Py_XDECREF(counts);
    Py_XDECREF(bounds);
    Py_XDECREF(last);
    Py_XDECREF(error);
    Py_DECREF(latency_obj);
    return result;
}

/* Session._answer's common case, after a fast_response(): SEND, then the counters and
 * the recorder. `kind` is the Decision's kind (the stats key). */
static PyObject *answer(PyObject *session, struct seccomp_notif_resp *resp,
                        PyObject *id, PyObject *tid, PyObject *syscall, PyObject *args,
                        double received, PyObject *outcome, PyObject *kind)
{
    /* The fd number as of now, as NotifyFd.send reads it: the handler may have closed
     * the session's fd, and its number may name another file already. */
    PyObject *notify = GET(session, s_notify);
    if (notify == NULL)
        return NULL;
    PyObject *fd_obj = GET(notify, s_fd);
    Py_DECREF(notify);
    if (fd_obj == NULL)
        return NULL;
    int fd = (int)PyLong_AsLong(fd_obj);
    Py_DECREF(fd_obj);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0) { /* closed (NotifyFd.close): what fcntl.ioctl says of it */
        PyErr_Format(PyExc_ValueError, "file descriptor cannot be a negative integer (%d)",
                     fd);
        return NULL;
    }
    int sent;
    /* EINTR: a signal while the kernel waited for the listener's lock, taken
     * interruptibly before anything else: nothing was answered, send it again (as
     * NotifyFd.send does). */
    while ((sent = ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, resp)) < 0 && errno == EINTR)
        ;
    if (sent < 0) {
        if (errno == ENOENT)
            return count_gone(session, s_send);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *stats = GET(session, s_stats);
    if (stats == NULL)
        return NULL;
    PyObject *result = NULL, *decisions = NULL, *latency_list = NULL, *recorder = NULL,
             *container = NULL, *bucket = NULL;
    if ((decisions = GET(stats, s_decisions)) == NULL)
        goto done;
    if (PyDict_CheckExact(decisions) ? increment_item(decisions, kind, 1) < 0
                                     : increment_item(decisions, kind, 0) < 0)
        goto done;
    if ((latency_list = GET(stats, s_latency)) == NULL ||
        (recorder = GET(session, s_recorder)) == NULL ||
        (container = GET(session, s_container)) == NULL)
        goto done;
    bucket = record_decided(recorder, container, id, tid, syscall, args, outcome, kind,
                            now() - received);
    if (bucket == NULL || increment_item(latency_list, bucket, 0) < 0)
        goto done;
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(bucket);
    Py_XDECREF(container);
    Py_XDECREF(recorder);
    Py_XDECREF(latency_list);
    Py_XDECREF(decisions);
    Py_DECREF(stats);
    return result;
}

static PyObject *call_on_ready(PyObject *reader, PyObject *mask)
{
    PyObject *args[2] = {reader, mask};
    return PyObject_VectorcallMethod(s_on_ready, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

/* The audit arch as an int: a new reference. A filter serves one or two architectures,
 * and their numbers (AUDIT_ARCH_X86_64 is 0xc000003e) are past CPython's cached small
 * ints: the last one is kept rather than allocated per notification. */
static PyObject *arch_int(uint32_t arch)
{
    static PyObject *last;
    if (last == NULL || PyLong_AsUnsignedLong(last) != arch) {
        PyObject *made = PyLong_FromUnsignedLong(arch);
        if (made == NULL)
            return NULL;
        Py_XSETREF(last, made);
    }
    Py_INCREF(last);
    return last;
}

/* Whether every async slot of `session` is taken (its inflight >= _max_inflight): 1, 0,
 * or -1 on error. */
static int slots_full(PyObject *session)
{
    PyObject *inflight = GET(session, s_inflight);
    if (inflight == NULL)
        return -1;
    PyObject *most = GET(session, s_max_inflight);
    if (most == NULL) {
        Py_DECREF(inflight);
        return -1;
    }
    int full = int_compare(inflight, most, Py_GE);
    Py_DECREF(inflight);
    Py_DECREF(most);
    return full;
}

/* The exception set, normalised and with its traceback (a new reference), cleared; NULL
 * if none was set. */
static PyObject *take_exception(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* The handler of `link` called, its result kept in *handed (a new reference; NULL when it
 * raised: *raised set and *handed the exception). `coroutine`: its result is a coroutine,
 * run to where it first waits (PyIter_Send, no StopIteration made): *trap is what it
 * yielded if it waits (then *handed is the coroutine). Returns -1 only for an error of
 * ours (the notification's slot could not be written). */
static int call_handler(PyObject *link, PyObject *n, int coroutine, PyObject **handed,
                        int *raised, PyObject **trap)
{
    *handed = NULL;
    *raised = 0;
    *trap = NULL;
    if (slot_set(notification_slots[N_READ_MEMORY], n, Py_False) < 0)
        return -1;
    PyObject *func = slot_get(link_func, link);
    if (func == NULL)
        return -1;
    PyObject *got = PyObject_Vectorcall(func, &n, 1, NULL);
    Py_DECREF(func);
    if (got != NULL && coroutine) {
        PyObject *value = NULL;
        PySendResult sent = PyIter_Send(got, Py_None, &value);
        if (sent == PYGEN_NEXT) {
            *trap = value;
            *handed = got;
            return 0;
        }
        Py_DECREF(got);
        got = sent == PYGEN_RETURN ? value : NULL;
    }
    if (got == NULL) {
        /* Every exception goes to Python's _decide_received, which turns a policy's
         * into on_error and raises the daemon's own again (session._daemon_own:
         * KeyboardInterrupt, Cancelled, in a group too). */
        PyObject *value = take_exception();
        if (value == NULL) { /* a send that failed with no exception set: ours */
            PyErr_SetString(PyExc_SystemError, "a handler failed without an exception");
            return -1;
        }
        *handed = value;
        *raised = 1;
    }
    else
        *handed = got;
    return 0;
}

/* A poll round's declared reads (see round_collect, after the InlineReader): what
 * run_links does with an async link's declared paths while a compiled round runs. */
enum { ROUND_NOT_MINE, ROUND_TAKEN, ROUND_NOTHING_TO_READ, ROUND_RAISED };
/* Paths one request may name (a call has two at most: rename): more take the pool. */
#define INLINE_MAX_STRINGS 8
/* Requests posted at once: a poll round's declared reads (Poller.MAX_EVENTS is 32). */
#define INLINE_MAX_REQUESTS 32
/* Strings of all the requests posted at once. */
#define INLINE_MAX_ALL_STRINGS 64
struct round_entry {
    /* strong references */
    PyObject *session, *n, *links, *allowed, *id, *tid, *nr, *arch, *args, *syscall,
        *wanted, *memory;
    Py_ssize_t index, count;
    unsigned long long notif_id;
    unsigned long long addresses[INLINE_MAX_STRINGS];
    pid_t tid_value;
    double received, wait;
    int fd;
};

struct poll_reads {
    PyObject *pool;         /* borrowed: the ReadPool */
    int fd;                 /* the listener fd of the session being decided */
    int fds;                /* listener fds the poller serves */
    Py_ssize_t n, strings;
    /* The InlineReader the entries are posted to as they are collected (a strong
     * reference), or NULL; `no_stream`: its reader could not take the first one. */
    PyObject *stream;
    struct inline_shared *stream_shared; /* its shared state, held since it opened */
    int no_stream;
    struct round_entry entries[INLINE_MAX_REQUESTS];
};

static PyObject *unread_paths_func, *link_paths;
static PyObject *s_slot, *s_use_proc_mem, *s_pool, *s_inline_wait, *s_deferred,
    *s_borrowers, *s_reads, *s_read_later, *s_inline, *s_round_wait, *s_inline_spin,
    *s_round_slow_until, *s_x86, *s_x86_64, *s_x32, *s_round_reads, *s_round_abandoned,
    *s_round_strikes;

/* The round running now in this thread (the event loop's), or NULL. */
static _Thread_local struct poll_reads *round_reads;
static int round_finish(struct poll_reads *round, PyObject *poller, PyObject **suspended);
static void round_stream(struct poll_reads *round);
static PyTypeObject InlineReaderType;
static int round_collect(struct poll_reads *round, PyObject *session, PyObject *n,
                         PyObject *link, PyObject *links, Py_ssize_t index,
                         PyObject *allowed, unsigned long long notif_id, PyObject *id,
                         PyObject *tid, PyObject *nr, PyObject *arch, PyObject *args,
                         PyObject *syscall, double received, PyObject **raised_exc);

/* The notification `n` from links[start] on: sync handlers called here, the first result
 * that is not an allow answered here (fast_response); anything else handed over to
 * Session._decide_received at the link reached, with what that link's handler returned
 * or raised. `resumed`: links[start] is an async link whose declared paths were read
 * (Session._prefetch), run here too: its plain function, or its coroutine's first step
 * (one that waits goes to Session._suspend). `allowed`: the Outcome of an earlier link's
 * allow, or None; it goes with the decision wherever Python takes it on (a refusal
 * answered here wins over it, as in Python). Owns none of its arguments. */
static PyObject *run_links(PyObject *session, PyObject *n, PyObject *links,
                           Py_ssize_t start, int resumed, PyObject *allowed,
                           unsigned long long notif_id, PyObject *id, PyObject *tid,
                           PyObject *nr, PyObject *arch, PyObject *args, PyObject *syscall,
                           double received, int collect)
{
    PyObject *result = NULL, *received_obj = NULL, *handed = NULL, *trap = NULL,
             *outcome = NULL, *policy = NULL, *kind = NULL, *index_obj = NULL;
    Py_ssize_t index = start;
    int raised = 0, hand_resumed = 0;

    for (; index < PyTuple_GET_SIZE(links); index++) {
        PyObject *link = PyTuple_GET_ITEM(links, index);
        if (Py_TYPE(link) != link_type) {
            hand_resumed = resumed && index == start;
            goto hand_over;
        }
        int coroutine = 0, here = resumed && index == start;
        if (!here) {
            PyObject *is_async = slot_get(link_is_async, link);
            if (is_async == NULL)
                goto done;
            Py_DECREF(is_async);
            if (is_async != Py_False) {
                /* Python reads its paths, parks it or runs its first step; or, in a
                 * compiled poll round, the round reads its declared paths. */
                if (!collect || round_reads == NULL)
                    goto hand_over;
                PyObject *exc = NULL;
                int got = round_collect(round_reads, session, n, link, links, index,
                                        allowed, notif_id, id, tid, nr, arch, args,
                                        syscall, received, &exc);
                if (got < 0)
                    goto done;
                if (got == ROUND_TAKEN) {
                    result = Py_None;
                    Py_INCREF(result);
                    goto done;
                }
                if (got == ROUND_RAISED) { /* its paths function raised: as its handler */
                    handed = exc;
                    raised = 1;
                    goto hand_over;
                }
                if (got == ROUND_NOT_MINE)
                    goto hand_over;
                here = 1; /* no path to read: its handler runs now, as a resumed one */
            }
        }
        if (here) {
            PyObject *is_coroutine = slot_get(link_coroutine, link);
            if (is_coroutine == NULL)
                goto done;
            Py_DECREF(is_coroutine);
            coroutine = is_coroutine == Py_True;
            if (!coroutine && is_coroutine != Py_False) {
                hand_resumed = 1;
                goto hand_over;
            }
            if (coroutine) {
                /* Every async slot taken: Python parks it (the paths are read). */
                int full = slots_full(session);
                if (full < 0)
                    goto done;
                if (full) {
                    hand_resumed = 1;
                    goto hand_over;
                }
            }
        }
        if (call_handler(link, n, coroutine, &handed, &raised, &trap) < 0)
            goto done;
        if (trap != NULL) {
            /* The coroutine waits (at `trap`): it takes a slot (one is free, checked
             * above) and is carried on suspended, as in Python. */
            if ((index_obj = PyLong_FromSsize_t(index)) == NULL ||
                (received_obj = PyFloat_FromDouble(received)) == NULL)
                goto done;
            PyObject *call[8] = {session, n, links, index_obj, received_obj, handed, trap,
                                 allowed};
            result = PyObject_VectorcallMethod(s_suspend, call,
                                               8 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            goto done;
        }
        if (raised)
            goto hand_over;
        if (handed == Py_None) {
            Py_CLEAR(handed);
            continue;
        }
        struct seccomp_notif_resp resp = {.id = notif_id};
        if (!fast_response(handed, &resp))
            goto hand_over;
        /* The Outcome reuse of the Python loop (session._last_outcome). */
        if ((policy = slot_get(link_policy, link)) == NULL ||
            (outcome = GET(session, s_last_outcome)) == NULL)
            goto done;
        PyObject *last_decision = NULL, *last_policy = NULL;
        if (Py_TYPE(outcome) == (PyTypeObject *)outcome_type) {
            if ((last_decision = slot_get(outcome_decision, outcome)) == NULL ||
                (last_policy = slot_get(outcome_policy, outcome)) == NULL) {
                Py_XDECREF(last_decision);
                goto done;
            }
            Py_DECREF(last_decision); /* compared by identity only */
            Py_DECREF(last_policy);
        }
        if (last_decision != handed || last_policy != policy) {
            Py_DECREF(outcome);
            PyObject *call[2] = {handed, policy};
            if ((outcome = PyObject_Vectorcall(outcome_type, call, 2, NULL)) == NULL ||
                PyObject_SetAttr(session, s_last_outcome, outcome) < 0)
                goto done;
        }
        if ((kind = slot_get(decision_kind, handed)) == NULL)
            goto done;
        result = answer(session, &resp, id, tid, syscall, args, received, outcome, kind);
        goto done;
    }
    /* Every link passed: Python gives the unhandled answer. */

hand_over:
    if ((received_obj = PyFloat_FromDouble(received)) == NULL ||
        (index_obj = PyLong_FromSsize_t(index)) == NULL)
        goto done;
    {
        PyObject *call[14] = {session, id, tid, nr, arch, args, received_obj, n, links,
                              index_obj, allowed, handed ? handed : Py_None,
                              raised ? Py_True : Py_False, Py_True};
        result = PyObject_VectorcallMethod(s_decide_received, call,
                                           13 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                           hand_resumed ? resumed_kwnames : NULL);
    }
done:
    Py_XDECREF(index_obj);
    Py_XDECREF(kind);
    Py_XDECREF(policy);
    Py_XDECREF(outcome);
    Py_XDECREF(trap);
    Py_XDECREF(handed);
    Py_XDECREF(received_obj);
    return result;
}

/* The notification's part after RECV and journal: route, sync handlers, answer; or the
 * hand-over to Session._decide_received. Owns none of its arguments. */
static PyObject *decide(PyObject *session, const struct seccomp_notif *notif,
                        double received)
{
    PyObject *result = NULL, *id = NULL, *tid = NULL, *nr = NULL, *arch = NULL,
             *args = NULL, *received_obj = NULL, *routes = NULL, *route = NULL,
             *n = NULL;
    PyObject *links, *syscall, *arch_label; /* borrowed from route */

    if ((id = PyLong_FromUnsignedLongLong(notif->id)) == NULL ||
        (tid = PyLong_FromUnsignedLong(notif->pid)) == NULL ||
        (nr = PyLong_FromLong(notif->data.nr)) == NULL ||
        (arch = arch_int(notif->data.arch)) == NULL ||
        (args = PyTuple_New(6)) == NULL)
        goto done;
    for (int i = 0; i < 6; i++) {
        PyObject *arg = PyLong_FromUnsignedLongLong(notif->data.args[i]);
        if (arg == NULL)
            goto done;
        PyTuple_SET_ITEM(args, i, arg);
    }

    /* What the Python path checks before the handlers, and leaves to Python here:
     * a token bucket, shadow mode (its answers are CONTINUE), a route not cached yet,
     * no links. */
    PyObject *bucket = GET(session, s_bucket);
    if (bucket == NULL)
        goto done;
    Py_DECREF(bucket); /* only compared with None */
    PyObject *shadow = GET(session, s_shadow);
    if (shadow == NULL)
        goto done;
    Py_DECREF(shadow);
    if (bucket != Py_None || shadow != Py_False)
        goto from_start;
    if ((routes = GET(session, s_routes)) == NULL)
        goto done;
    if (PyDict_CheckExact(routes)) {
        PyObject *by_nr = PyDict_GetItemWithError(routes, arch); /* borrowed */
        if (by_nr != NULL && PyDict_CheckExact(by_nr)) {
            route = PyDict_GetItemWithError(by_nr, nr);
            Py_XINCREF(route);
        }
        if (PyErr_Occurred())
            goto done;
    }
    if (route == NULL || !PyTuple_CheckExact(route) || PyTuple_GET_SIZE(route) != 3 ||
        !PyTuple_CheckExact(links = PyTuple_GET_ITEM(route, 2)) ||
        PyTuple_GET_SIZE(links) == 0)
        goto from_start;
    syscall = PyTuple_GET_ITEM(route, 0);
    arch_label = PyTuple_GET_ITEM(route, 1);

    /* make_notification(): the same slots, written through their descriptors. */
    if ((n = notification_type->tp_alloc(notification_type, 0)) == NULL)
        goto done;
    {
        PyObject *container = GET(session, s_container);
        if (container == NULL)
            goto done;
        PyObject *memory = GET(session, s_memory);
        if (memory == NULL) {
            Py_DECREF(container);
            goto done;
        }
        PyObject *values[N_SLOTS] = {id, tid, nr, arch_label, syscall, args, container,
                                     memory, Py_False, Py_None};
        int rc = 0;
        for (int i = 0; i < N_SLOTS && rc == 0; i++)
            rc = slot_set(notification_slots[i], n, values[i]);
        Py_DECREF(container);
        Py_DECREF(memory);
        if (rc < 0)
            goto done;
    }
    result = run_links(session, n, links, 0, 0, Py_None, notif->id, id, tid, nr, arch, args,
                       syscall, received, 1);
    goto done;

from_start:
    if ((received_obj = PyFloat_FromDouble(received)) == NULL)
        goto done;
    {
        PyObject *call[7] = {session, id, tid, nr, arch, args, received_obj};
        result = PyObject_VectorcallMethod(s_decide_received, call,
                                           7 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
done:
    Py_XDECREF(n);
    Py_XDECREF(route);
    Py_XDECREF(routes);
    Py_XDECREF(received_obj);
    Py_XDECREF(args);
    Py_XDECREF(arch);
    Py_XDECREF(nr);
    Py_XDECREF(tid);
    Py_XDECREF(id);
    return result;
}

PyDoc_STRVAR(resume_doc,
"resume(session, n, links, index, received, allowed) -> Suspended | None\n\n"
"Session._decide_received(..., n, links, index, allowed, resumed=True) for a decision\n"
"whose links[index] declared paths that are read now (Session._prefetch, inline or\n"
"delivered later; `allowed`: an earlier link's allow, or None): its handler and the\n"
"later links run here as the compiled loop runs them, and what is not its common case\n"
"goes to the Python method at the point reached. Returns what that method returns.");

static PyObject *resume(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 6) {
        PyErr_SetString(PyExc_TypeError, "resume takes 6 arguments");
        return NULL;
    }
    PyObject *session = argv[0], *n = argv[1], *links = argv[2], *allowed = argv[5];
    if (Py_TYPE(n) != notification_type || !PyTuple_CheckExact(links)) {
        PyErr_SetString(PyExc_TypeError, "resume takes a Notification and a tuple of links");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(argv[3]);
    double received = PyFloat_AsDouble(argv[4]);
    if ((index == -1 || received == -1.0) && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= PyTuple_GET_SIZE(links)) {
        PyErr_SetString(PyExc_IndexError, "resume: no such link");
        return NULL;
    }
    PyObject *result = NULL, *shadow = NULL;
    PyObject *id = slot_get(notification_slots[N_ID], n),
             *tid = slot_get(notification_slots[N_PID], n),
             *nr = slot_get(notification_slots[N_NR], n),
             *args = slot_get(notification_slots[N_ARGS], n),
             *syscall = slot_get(notification_slots[N_SYSCALL], n);
    if (id == NULL || tid == NULL || nr == NULL || args == NULL || syscall == NULL)
        goto done;
    unsigned long long notif_id = PyLong_AsUnsignedLongLong(id);
    if (notif_id == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    if (Py_TYPE(session) == session_type && (shadow = GET(session, s_shadow)) == NULL)
        goto done;
    if (shadow == Py_False)
        result = run_links(session, n, links, index, 1, allowed, notif_id, id, tid, nr, zero,
                           args, syscall, received, 0);
    else {
        /* Not the common case (shadow mode answers CONTINUE; a subclass of Session may
         * change anything): all of it in Python. */
        PyObject *call[14] = {session, id, tid, nr, zero, args, argv[4], n, links, argv[3],
                              allowed, Py_None, Py_False, Py_True};
        result = PyObject_VectorcallMethod(s_decide_received, call,
                                           13 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                           resumed_kwnames);
    }
done:
    Py_XDECREF(shadow);
    Py_XDECREF(syscall);
    Py_XDECREF(args);
    Py_XDECREF(nr);
    Py_XDECREF(tid);
    Py_XDECREF(id);
    return result;
}

/* Session.on_ready(events) for a Session (exact type) with POLLIN: RECV, journal,
 * decide(). Anything else goes to the Python method. */
static PyObject *session_ready(PyObject *session, PyObject *mask, unsigned int events)
{
    if (!(events & EPOLLIN))
        return call_on_ready(session, mask);
    PyObject *notify = GET(session, s_notify);
    if (notify == NULL)
        return NULL;
    PyObject *fd_obj = GET(notify, s_fd);
    Py_DECREF(notify);
    if (fd_obj == NULL)
        return NULL;
    int fd = (int)PyLong_AsLong(fd_obj);
    Py_DECREF(fd_obj);
    if (fd < 0) {
        PyErr_Clear();
        return call_on_ready(session, mask); /* closed */
    }
    /* RECV into our own stack, not the session's buffer (NotifyFd.recv_buffer, which
     * only the Python RECV and the Python journal use): at K=1000 busy sessions every
     * line of per-session state touched per notification is a cache miss, and the
     * buffer and its bytearray are three of them (bench/README.md, "Session 8"). */
    struct seccomp_notif copy;
    memset(&copy, 0, sizeof(copy)); /* RECV needs it zeroed */
    int rc, err;
    count_recv(); /* odd: a RECV runs */
    if (recv_watched && pthread_equal(pthread_self(), recv_watched_thread)) {
        /* The GIL held, as for SEND: after POLLIN this RECV does not wait, unless
         * another process took the call, and then the compiled watchdog, which needs
         * no GIL, interrupts it. Let go of, the GIL went to the reading thread whenever
         * that one wanted it, and the loop slept until it came back: at 100 busy targets
         * 1.2-2.4 futex calls and 0.5-0.65 context switches per guarded call
         * (bench/README.md, "Session 14"). */
        rc = ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &copy);
        err = errno;
    }
    else {
        Py_BEGIN_ALLOW_THREADS
        rc = ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &copy);
        err = errno;
        Py_END_ALLOW_THREADS
    }
    count_recv();
    if (rc < 0) {
        if (err == ENOENT)
            return count_gone(session, s_recv);
        if (err == EINTR) {
            /* Run the Python signal handlers first, as fcntl.ioctl does (one may
             * raise: KeyboardInterrupt). Only a RECV that waited is interrupted. */
            if (PyErr_CheckSignals() < 0)
                return NULL;
            PyObject *args[1] = {session};
            PyObject *r = PyObject_VectorcallMethod(
                s_read_elsewhere, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            Py_RETURN_NONE;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    double received = now();
    if (round_reads != NULL)
        round_reads->fd = fd;
    PyObject *stats = GET(session, s_stats);
    if (stats == NULL)
        return NULL;
    rc = INCREMENT(stats, s_notifications);
    Py_DECREF(stats);
    if (rc < 0)
        return NULL;
    PyObject *journal = GET(session, s_journal);
    if (journal == NULL)
        return NULL;
    rc = journal == Py_None ? 0 : journal_record(journal, &copy);
    Py_DECREF(journal);
    if (rc < 0)
        return NULL;
    return decide(session, &copy, received);
}

PyDoc_STRVAR(poll_round_doc,
"poll_round(poller, epoll_fd, readers, max_events, budget=0) -> (events, suspended)\n\n"
"One round of Poller.run: epoll_wait with timeout 0, then for each event the reader's\n"
"on_ready(mask) (a Session's in C), stopping at the first that returns a Suspended.\n"
"A reader whose on_ready raises an Exception is unregistered from the poller and gets\n"
"on_failure(exc). With a budget, rounds follow each other until one reports no event,\n"
"one ends with a Suspended, or `budget` events were reported. Returns the number of\n"
"events reported and the Suspended or None.");

/* fd -> reader, for the poller's own dict (Poller._readers) only: the same answer as
 * readers.get(fd) while Poller._generation is the object cached here, because
 * Poller.register/unregister, the only writers of that dict, set a new one (from a
 * process-wide count: no two states of any poller share a value). The readers are
 * borrowed: the dict holds them as long as the generation stands, and it is checked
 * before every use, as a callback of the round may unregister. At K=1000 busy sessions
 * the dict lookup (a new int for the fd, the index line, the entry line, the key's int)
 * was three cache misses per notification; this array is 8 bytes per fd and stays hot. */
#define READER_CACHE_MAX 65536
static PyObject **reader_cache;
static Py_ssize_t reader_cache_size;
static PyObject *reader_cache_generation; /* strong; NULL: the cache is empty */

static void reader_cache_clear(void)
{
    if (reader_cache != NULL)
        memset(reader_cache, 0, (size_t)reader_cache_size * sizeof(*reader_cache));
    Py_CLEAR(reader_cache_generation);
}

/* The reader of fd (borrowed) or NULL (none, or an error set). `own` is nonzero when
 * `readers` is the poller's own dict. */
static PyObject *find_reader(PyObject *poller, PyObject *readers, int own, int fd)
{
    PyObject *generation = NULL;
    if (own && fd >= 0 && fd < READER_CACHE_MAX) {
        if ((generation = GET(poller, s_generation)) == NULL)
            return NULL;
        if (generation != reader_cache_generation)
            reader_cache_clear();
        else if (fd < reader_cache_size && reader_cache[fd] != NULL) {
            Py_DECREF(generation);
            return reader_cache[fd];
        }
    }
    PyObject *key = PyLong_FromLong(fd);
    if (key == NULL) {
        Py_XDECREF(generation);
        return NULL;
    }
    PyObject *reader = PyDict_GetItemWithError(readers, key); /* borrowed */
    Py_DECREF(key);
    if (reader != NULL && generation != NULL) {
        if (fd >= reader_cache_size) {
            Py_ssize_t size = reader_cache_size ? reader_cache_size : 1024;
            while (size <= fd)
                size *= 2;
            PyObject **grown = PyMem_Realloc(reader_cache, (size_t)size * sizeof(*grown));
            if (grown == NULL) { /* no cache, no harm */
                Py_DECREF(generation);
                return reader;
            }
            memset(grown + reader_cache_size, 0,
                   (size_t)(size - reader_cache_size) * sizeof(*grown));
            reader_cache = grown;
            reader_cache_size = size;
        }
        reader_cache[fd] = reader;
        if (reader_cache_generation == NULL) {
            reader_cache_generation = generation;
            generation = NULL;
        }
    }
    Py_XDECREF(generation);
    return reader;
}

/* A reader whose on_ready raised an Exception (set): it is unregistered from the poller
 * and gets on_failure(exc). 0, or -1 if that failed (or the error is not an Exception:
 * still set). */
static int reader_failed(PyObject *poller, PyObject *reader, int fd)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *value = take_exception(), *fd_obj = PyLong_FromLong(fd), *u = NULL, *f = NULL;
    if (fd_obj != NULL) {
        PyObject *unregister_args[2] = {poller, fd_obj};
        u = PyObject_VectorcallMethod(s_unregister, unregister_args,
                                      2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    if (u != NULL) {
        PyObject *failure_args[2] = {reader, value};
        f = PyObject_VectorcallMethod(s_on_failure, failure_args,
                                      2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(u);
    Py_XDECREF(value);
    Py_XDECREF(fd_obj);
    if (f == NULL)
        return -1;
    Py_DECREF(f);
    return 0;
}

/* One round: epoll_wait(0), then each event's reader. Sets *count (events reported) and
 * *suspended (a new reference: the Suspended that stopped the round, or None). */
static int one_round(PyObject *poller, int epfd, PyObject *readers, int own, int max_events,
                     struct poll_reads *round, int *count_out, PyObject **suspended_out)
{
    struct epoll_event events[MAX_ROUND_EVENTS];
    int count;
    while ((count = epoll_wait(epfd, events, max_events, 0)) < 0) {
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) /* select.epoll retries after the handlers */
            return -1;
    }
    PyObject *suspended = Py_None;
    Py_INCREF(suspended);
    round_reads = round;
    for (int i = 0; i < count; i++) {
        /* Looked up now: an fd unregistered (maybe closed and its number reused) by a
         * callback of this round is skipped, not read. */
        PyObject *reader = find_reader(poller, readers, own, events[i].data.fd);
        if (reader == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        Py_INCREF(reader); /* on_ready may unregister it */
        PyObject *mask = PyLong_FromUnsignedLong(events[i].events);
        PyObject *r = NULL;
        if (mask != NULL)
            r = Py_TYPE(reader) == session_type ? session_ready(reader, mask, events[i].events)
                                                : call_on_ready(reader, mask);
        Py_XDECREF(mask);
        if (r == NULL) {
            int failed = reader_failed(poller, reader, events[i].data.fd);
            Py_DECREF(reader);
            if (failed < 0)
                goto fail;
            continue;
        }
        Py_DECREF(reader);
        if (r != Py_None) {
            Py_SETREF(suspended, r);
            break;
        }
        Py_DECREF(r);
    }
    round_reads = NULL;
    if (round != NULL && round_finish(round, poller, &suspended) < 0)
        goto fail;
    *count_out = count;
    *suspended_out = suspended;
    return 0;
fail:
    round_reads = NULL;
    if (round != NULL && round->n > 0) {
        /* What the round collected reads through the pool (none decides here). */
        PyObject *type, *value, *tb, *none_may_suspend = Py_True;
        PyErr_Fetch(&type, &value, &tb);
        Py_INCREF(none_may_suspend);
        if (round_finish(round, poller, &none_may_suspend) < 0)
            PyErr_Clear();
        Py_DECREF(none_may_suspend);
        PyErr_Restore(type, value, tb);
    }
    Py_DECREF(suspended);
    return -1;
}

static PyObject *poll_round(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc < 4 || argc > 6) {
        PyErr_SetString(PyExc_TypeError, "poll_round takes 4 to 6 arguments");
        return NULL;
    }
    PyObject *poller = argv[0], *readers = argv[2];
    int epfd = (int)PyLong_AsLong(argv[1]);
    long max_events = PyLong_AsLong(argv[3]);
    long budget = argc >= 5 ? PyLong_AsLong(argv[4]) : 0;
    PyObject *pool = argc == 6 && argv[5] != Py_None ? argv[5] : NULL;
    if (PyErr_Occurred())
        return NULL;
    if (!PyDict_CheckExact(readers)) {
        PyErr_SetString(PyExc_TypeError, "readers must be a dict");
        return NULL;
    }
    if (max_events < 1 || max_events > MAX_ROUND_EVENTS)
        max_events = MAX_ROUND_EVENTS;
    /* The fd cache serves the poller's own dict only (see find_reader). */
    PyObject *own_readers = GET(poller, s_readers);
    int own = own_readers == readers;
    Py_XDECREF(own_readers);
    PyErr_Clear(); /* not a Poller: no cache */
    PyObject *suspended = NULL;
    long served = 0;
    /* The round's declared reads (see round_collect): only with the poller's own
     * readers (a test's dict of other readers has no sessions to read for). */
    struct poll_reads round;
    round.pool = pool;
    round.fd = -1;
    round.fds = (int)PyDict_GET_SIZE(readers);
    round.n = round.strings = 0;
    round.stream = NULL;
    round.stream_shared = NULL;
    round.no_stream = 0;
    struct poll_reads *reads = pool != NULL && own && unread_paths_func != NULL ? &round
                                                                                  : NULL;
    for (;;) {
        int count;
        if (one_round(poller, epfd, readers, own, (int)max_events, reads, &count,
                      &suspended) < 0)
            return NULL;
        served += count;
        /* Poller.run's loop, here while it would only call the next round: at K=1 its
         * pass through the interpreter was ~1,000 instructions per notification. It
         * returns on an empty round (the task then sleeps), a Suspended, or `budget`
         * events (the task then lets the rest of the daemon run). */
        if (count == 0 || suspended != Py_None || served >= budget)
            break;
        Py_DECREF(suspended);
        suspended = NULL;
        /* What the interpreter does between two calls: run the signal handlers (one may
         * raise: KeyboardInterrupt). */
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    PyObject *out = PyTuple_New(2), *served_obj = PyLong_FromLong(served);
    if (out == NULL || served_obj == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(served_obj);
        Py_DECREF(suspended);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, served_obj);
    PyTuple_SET_ITEM(out, 1, suspended); /* steals it */
    return out;
}

PyDoc_STRVAR(recv_calls_doc,
"recv_calls() -> int\n\nRECVs begun plus RECVs ended by the compiled loop (odd while\n"
"one runs): added to notifyfd._RecvWatch.calls by the watchdog.");

static PyObject *recv_calls(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(atomic_load(&recv_calls_count));
}

/* The compiled watchdog: every `interval`, a RECV of the compiled loop that was running
 * at the last look already (the count odd and unchanged) is interrupted with `signum`
 * sent to the watched thread (RECV waits in down_interruptible and returns EINTR; the
 * handler is installed without SA_RESTART). notifyfd._RecvWatch.run is its Python twin,
 * which needs the GIL to look: it could not see a RECV made with the GIL held. */
struct recv_watch {
    struct timespec interval;
    pthread_t thread;
    int signum;
};

static void *recv_watch_main(void *arg)
{
    struct recv_watch watch = *(struct recv_watch *)arg;
    free(arg);
    unsigned long long seen = 0;
    for (;;) {
        struct timespec left = watch.interval;
        while (nanosleep(&left, &left) < 0 && errno == EINTR)
            ;
        unsigned long long calls = atomic_load(&recv_calls_count);
        if ((calls & 1) && calls == seen) {
            atomic_fetch_add(&recv_interrupted_count, 1);
            pthread_kill(watch.thread, watch.signum);
        }
        seen = calls;
    }
    return NULL;
}

/* In a child forked from the daemon only the forking thread runs on: no watchdog. */
static void recv_watch_forked(void)
{
    recv_watched = 0;
    atomic_store(&recv_calls_count, 0);
}

PyDoc_STRVAR(watch_recv_doc,
"watch_recv(interval, signum) -> bool\n\n"
"Start the compiled watchdog for this thread's RECVs made here, once per process: a\n"
"RECV still running after between one and two `interval`s gets `signum` (its handler\n"
"must be installed, without SA_RESTART). From then on this thread's RECVs hold the GIL.\n"
"False if it runs already (for any thread) or no thread could be started.");

static PyObject *watch_recv(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "watch_recv takes 2 arguments");
        return NULL;
    }
    double interval = PyFloat_AsDouble(argv[0]);
    long signum = PyLong_AsLong(argv[1]);
    if ((interval == -1.0 || signum == -1) && PyErr_Occurred())
        return NULL;
    if (!(interval > 0 && interval < 3600) || signum <= 0 || signum >= NSIG) {
        PyErr_SetString(PyExc_ValueError, "watch_recv: interval or signal out of range");
        return NULL;
    }
    if (recv_watched)
        Py_RETURN_FALSE;
    struct recv_watch *watch = malloc(sizeof(*watch));
    if (watch == NULL)
        return PyErr_NoMemory();
    watch->interval.tv_sec = (time_t)interval;
    watch->interval.tv_nsec = (long)((interval - (double)watch->interval.tv_sec) * 1e9);
    pthread_t watched = pthread_self();
    watch->thread = watched;
    watch->signum = (int)signum;
    /* Every signal blocked in the new thread (it inherits the mask): a signal sent to
     * the process is then delivered to a thread that runs Python, not to this one. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_t attr;
    pthread_t thread;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        rc = pthread_create(&thread, &attr, recv_watch_main, watch);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    if (rc != 0) {
        free(watch);
        Py_RETURN_FALSE;
    }
    recv_watched_thread = watched; /* (not watch->thread: the new thread frees it) */
    recv_watched = 1;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(recv_interrupted_doc,
"recv_interrupted() -> int\n\nRECVs the compiled watchdog interrupted so far.");

static PyObject *recv_interrupted(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(atomic_load(&recv_interrupted_count));
}

PyDoc_STRVAR(id_valid_doc,
"id_valid(fd, notif_id) -> bool\n\n"
"SECCOMP_IOCTL_NOTIF_ID_VALID on listener `fd`, the GIL held (as SEND: the kernel only\n"
"takes the filter's lock and looks the id up): True while the call still waits for its\n"
"answer, False once it does not (ENOENT). Retried after a signal (EINTR), once the\n"
"Python handlers ran; any other error raises OSError, a negative fd ValueError (as\n"
"fcntl.ioctl does). notifyfd.NotifyFd.id_valid's twin, for the memory reads' check\n"
"after the read.");

static PyObject *id_valid(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "id_valid takes 2 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(argv[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long notif_id = PyLong_AsUnsignedLongLong(argv[1]);
    if (notif_id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) { /* as fcntl.ioctl refuses a closed NotifyFd's -1 */
        PyErr_Format(PyExc_ValueError, "file descriptor cannot be a negative integer (%ld)",
                     fd);
        return NULL;
    }
    for (;;) {
        __u64 value = notif_id;
        if (ioctl((int)fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &value) == 0)
            Py_RETURN_TRUE;
        if (errno == ENOENT)
            Py_RETURN_FALSE;
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

PyDoc_STRVAR(setup_doc,
"setup(Session, Notification, Link, Decision, Outcome, Recorder, unread_paths)\n\n"
"The classes the fast path recognises, and session._unread_paths (called once by\n"
"supervisor.session).");

static PyObject *setup(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 7 || !PyCallable_Check(argv[6])) {
        PyErr_SetString(PyExc_TypeError, "setup takes 6 classes and a function");
        return NULL;
    }
    for (int i = 0; i < 6; i++)
        if (!PyType_Check(argv[i])) {
            PyErr_SetString(PyExc_TypeError, "setup takes 6 classes and a function");
            return NULL;
        }
    static const char *const slots[N_SLOTS] = {"id", "pid", "nr", "arch", "syscall", "args",
                                                "container", "_memory", "_read_memory",
                                                "_paths"};
    PyTypeObject *notification = (PyTypeObject *)argv[1], *link = (PyTypeObject *)argv[2],
                 *decision = (PyTypeObject *)argv[3], *outcome = (PyTypeObject *)argv[4];
    PyObject *found[N_SLOTS + 11] = {NULL};
    for (int i = 0; i < N_SLOTS; i++)
        if ((found[i] = member_descriptor(notification, slots[i])) == NULL)
            goto fail;
    if ((found[N_SLOTS] = member_descriptor(link, "policy")) == NULL ||
        (found[N_SLOTS + 1] = member_descriptor(link, "func")) == NULL ||
        (found[N_SLOTS + 2] = member_descriptor(link, "is_async")) == NULL ||
        (found[N_SLOTS + 3] = member_descriptor(decision, "kind")) == NULL ||
        (found[N_SLOTS + 4] = member_descriptor(decision, "_response")) == NULL ||
        (found[N_SLOTS + 5] = member_descriptor(outcome, "decision")) == NULL ||
        (found[N_SLOTS + 6] = member_descriptor(outcome, "policy")) == NULL ||
        (found[N_SLOTS + 7] = member_descriptor(outcome, "error")) == NULL ||
        (found[N_SLOTS + 8] = member_descriptor(outcome, "audit_hot")) == NULL ||
        (found[N_SLOTS + 9] = member_descriptor(link, "coroutine")) == NULL ||
        (found[N_SLOTS + 10] = member_descriptor(link, "paths")) == NULL)
        goto fail;
    for (int i = 0; i < N_SLOTS; i++)
        Py_XSETREF(notification_slots[i], found[i]);
    Py_XSETREF(link_policy, found[N_SLOTS]);
    Py_XSETREF(link_func, found[N_SLOTS + 1]);
    Py_XSETREF(link_is_async, found[N_SLOTS + 2]);
    Py_XSETREF(decision_kind, found[N_SLOTS + 3]);
    Py_XSETREF(decision_response, found[N_SLOTS + 4]);
    Py_XSETREF(outcome_decision, found[N_SLOTS + 5]);
    Py_XSETREF(outcome_policy, found[N_SLOTS + 6]);
    Py_XSETREF(outcome_error, found[N_SLOTS + 7]);
    Py_XSETREF(outcome_audit_hot, found[N_SLOTS + 8]);
    Py_XSETREF(link_coroutine, found[N_SLOTS + 9]);
    Py_XSETREF(link_paths, found[N_SLOTS + 10]);
    Py_XSETREF(unread_paths_func, Py_NewRef(argv[6]));
    for (int i = 0; i < 6; i++)
        Py_INCREF(argv[i]);
    Py_XSETREF(session_type, (PyTypeObject *)argv[0]);
    Py_XSETREF(notification_type, notification);
    Py_XSETREF(link_type, link);
    Py_XSETREF(decision_type, decision);
    Py_XSETREF(outcome_type, argv[4]);
    Py_XSETREF(recorder_type, (PyTypeObject *)argv[5]);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < N_SLOTS + 11; i++)
        Py_XDECREF(found[i]);
    return NULL;
}

/* ------------------------------------------------------------------ the audit line
 *
 * format_audit_line(entry, max_line) is audit.audit_text's direct formatting, step by
 * step: the same checks, the same text. It returns None wherever audit_text leaves its
 * fast path (a value that is not exactly an int, float, str or bool, a number out of the
 * ranges below, a surrogate escape): audit_text then takes its general path, so this
 * code never has to be right about a rare case. A line over max_line is cut here as
 * audit._dumps cuts it (cut_line): a line naming a long path, which a container chooses,
 * took ~50 us in Python, against ~4 here. */

enum { F_ID, F_PID, F_PEER_UID, F_DECISION, F_POLICY, F_DETAIL, F_ERROR, F_KIND, F_ERRNO,
       F_VALUE, F_REASON, F_NAMES };
static PyObject *f_names[F_NAMES];

/* At least the bytes `s` takes as json.encoder.encode_basestring_ascii writes it,
 * quotes included: 1 per ASCII character at best, 6 for one written as \uXXXX, 12 above
 * U+FFFF (a surrogate pair). */
static Py_ssize_t json_ascii_bound(PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    return 2 + (PyUnicode_KIND(s) == PyUnicode_4BYTE_KIND ? 12 : 6) * n;
}

/* The bytes json writes for a character below 256 beyond the one it takes: 0 for
 * printable ASCII, 1 for the quote, the backslash and the short escapes (\n...), 5 for
 * the rest (\u00XX). Filled by format_audit_line_init. */
static unsigned char json_extra[256];

/* How many of the n bytes at `b` json writes as they are (printable ASCII but the quote
 * and the backslash), up to the first one it escapes: eight at a time while none is
 * (a path is mostly such bytes), with the usual tests for a byte below a value or equal
 * to one across a word, exact as a yes or no for the word. */
static Py_ssize_t plain_run(const unsigned char *b, Py_ssize_t n)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, b + i, 8);
        uint64_t quote = x ^ (ones * '"'), backslash = x ^ (ones * '\\'),
                 del = x ^ (ones * 0x7f);
        if ((x | ((x - ones * 0x20) & ~x) | ((quote - ones) & ~quote) |
             ((backslash - ones) & ~backslash) | ((del - ones) & ~del)) & highs)
            break; /* a byte >= 0x80, < 0x20, '"', '\\' or DEL in these eight */
    }
    while (i < n && b[i] >= 0x20 && b[i] < 0x7f && b[i] != '"' && b[i] != '\\')
        i++;
    return i;
}

/* Appends s[:n] as encode_basestring_ascii writes it (py_encode_basestring_ascii in
 * CPython's Modules/_json.c), quoted: the short escapes, other control characters and
 * every non-ASCII character as \u00XX (lower-case hex), above U+FFFF as a surrogate
 * pair. `out` has room for json_ascii_bound(s) bytes; `*escaped` is set when an escape
 * is written. */
static char *json_ascii(char *out, PyObject *s, Py_ssize_t n, int *escaped)
{
    static const char hex[] = "0123456789abcdef";
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    *out++ = '"';
    if (PyUnicode_IS_ASCII(s)) {
        /* The common case: copied as is up to the first character to escape. */
        const Py_UCS1 *bytes = PyUnicode_1BYTE_DATA(s);
        Py_ssize_t i = plain_run(bytes, n);
        memcpy(out, bytes, i);
        out += i;
        if (i == n) {
            *out++ = '"';
            return out;
        }
        n -= i;
        data = bytes + i;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            *out++ = (char)c;
            continue;
        }
        *escaped = 1;
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; continue;
        case '\\': *out++ = '\\'; continue;
        case '\n': *out++ = 'n'; continue;
        case '\r': *out++ = 'r'; continue;
        case '\t': *out++ = 't'; continue;
        case '\b': *out++ = 'b'; continue;
        case '\f': *out++ = 'f'; continue;
        }
        if (c > 0xffff) {
            Py_UCS4 v = c - 0x10000;
            Py_UCS4 high = 0xd800 | ((v >> 10) & 0x3ff);
            *out++ = 'u';
            for (int shift = 12; shift >= 0; shift -= 4)
                *out++ = hex[(high >> shift) & 0xf];
            *out++ = '\\';
            c = 0xdc00 | (v & 0x3ff);
        }
        *out++ = 'u';
        for (int shift = 12; shift >= 0; shift -= 4)
            *out++ = hex[(c >> shift) & 0xf];
    }
    *out++ = '"';
    return out;
}

/* `u` in decimal (base 10) or lower-case hex (base 16) at `out`; returns the length.
 * (sprintf took ~700 instructions per number: a line has eleven.) */
static Py_ssize_t put_unsigned(char *out, unsigned long long u, unsigned base)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[20]; /* 2**64 - 1 has 20 decimal digits, 16 hex */
    int n = 0;
    if (base == 16)
        do {
            tmp[n++] = digits[u & 0xf];
            u >>= 4;
        } while (u != 0);
    else
        do {
            tmp[n++] = digits[u % 10]; /* a constant divisor: a multiplication */
            u /= 10;
        } while (u != 0);
    for (int i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* `v` (an exact int) at `out` as "%d" or, with `hex`, as "%#x" and hex() write it; 0 if
 * it is negative with `hex` or does not fit 64 bits (audit_text's % then, via None), -1
 * on an error. At most 21 bytes. */
static int int_text(char *out, PyObject *v, int hex, Py_ssize_t *len)
{
    int overflow = 0;
    long long s = PyLong_AsLongLongAndOverflow(v, &overflow);
    unsigned long long u;
    if (overflow == 0) {
        if (s == -1 && PyErr_Occurred())
            return -1;
        if (s < 0) {
            if (hex)
                return 0;
            *out = '-';
            /* -(s + 1) + 1: no overflow for LLONG_MIN */
            *len = 1 + put_unsigned(out + 1, (unsigned long long)(-(s + 1)) + 1, 10);
            return 1;
        }
        u = (unsigned long long)s;
    } else if (overflow > 0) {
        u = PyLong_AsUnsignedLongLong(v);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            return 0;
        }
    } else
        return 0;
    if (!hex) {
        *len = put_unsigned(out, u, 10);
        return 1;
    }
    /* hex(0) is "0x0" (C's "%#x" writes a bare 0). */
    out[0] = '0';
    out[1] = 'x';
    *len = 2 + put_unsigned(out + 2, u, 16);
    return 1;
}

#ifdef __SIZEOF_INT128__
/* x (finite, 0 <= |x| < 2**52) as f"{x:.{decimals}f}" writes it, decimals <= 6, at `out`;
 * returns the length (at most 24). float.__format__ rounds the binary value exactly, ties
 * to even (_Py_dg_dtoa, mode 3): so does this, in integers. x = m * 2**e with m < 2**53;
 * x * 10**decimals < 2**73 fits 128 bits. (PyOS_double_to_string took ~1,700
 * instructions per float: its bignum arithmetic is general.) */
static Py_ssize_t put_fixed(char *out, double x, int decimals)
{
    static const unsigned long long scale[] = {1, 10, 100, 1000, 10000, 100000, 1000000};
    char *start = out;
    if (signbit(x)) {
        *out++ = '-'; /* "-0.0": the only negative value the callers let through */
        x = -x;
    }
    int exp2;
    double fraction = frexp(x, &exp2); /* x = fraction * 2**exp2, 0.5 <= fraction < 1 */
    unsigned long long m = (unsigned long long)ldexp(fraction, 53); /* exact */
    int e = exp2 - 53;
    unsigned __int128 q;
    if (x == 0.0)
        q = 0;
    else if (e >= 0)
        q = ((unsigned __int128)m << e) * scale[decimals];
    else if (e <= -127)
        q = 0; /* x * 10**decimals < 2**73 / 2**127: far below one half */
    else {
        unsigned __int128 num = (unsigned __int128)m * scale[decimals];
        int k = -e;
        q = num >> k;
        unsigned __int128 rem = num - (q << k), half = (unsigned __int128)1 << (k - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
    }
    unsigned long long whole = (unsigned long long)(q / scale[decimals]),
                       part = (unsigned long long)(q % scale[decimals]);
    out += put_unsigned(out, whole, 10);
    *out++ = '.';
    for (int i = decimals - 1; i >= 0; i--) {
        out[i] = (char)('0' + part % 10);
        part /= 10;
    }
    out += decimals;
    return out - start;
}
#else
static Py_ssize_t put_fixed(char *out, double x, int decimals)
{
    char *text = PyOS_double_to_string(x, 'f', decimals, 0, NULL);
    if (text == NULL)
        return -1;
    Py_ssize_t len = (Py_ssize_t)strlen(text);
    memcpy(out, text, len);
    PyMem_Free(text);
    return len;
}
#endif

/* The bytes s[:n] takes as encode_basestring_ascii writes it, without quotes. */
static Py_ssize_t json_ascii_size(PyObject *s, Py_ssize_t n)
{
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t size = n; /* a byte each, and json_extra's bytes beyond */
    if (kind == PyUnicode_1BYTE_KIND) {
        /* A long path: ~0.3 ns a character, where PyUnicode_READ's loop took ~1.5. */
        const Py_UCS1 *bytes = data;
        for (Py_ssize_t i = 0; (i += plain_run(bytes + i, n - i)) < n; i++)
            size += json_extra[bytes[i]];
        return size;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        size += c < 256 ? json_extra[c] : c > 0xffff ? 11 : 5;
    }
    return size;
}

/* One string of the line as written: the first `keep` characters of the str `s` (or of
 * the ASCII `ascii`, the id's hex, which needs no escape) and, once cut, the marker
 * "...[lost more]" (audit._dumps). */
struct line_field {
    PyObject *s;
    char ascii[24];
    Py_ssize_t length, keep, lost;
    int cut;
};

/* "...[N more]": N in decimal, which may be negative (a marker longer than what it
 * replaced); returns the length, at `out` unless NULL. */
static Py_ssize_t put_marker(char *out, Py_ssize_t lost)
{
    char tmp[48];
    int n = snprintf(tmp, sizeof(tmp), "...[%zd more]", lost);
    if (out != NULL)
        memcpy(out, tmp, n);
    return n;
}

/* The bytes field value[:n] takes in JSON, without quotes. */
static Py_ssize_t field_prefix_size(struct line_field *f, Py_ssize_t n)
{
    Py_ssize_t from_s = n < f->keep ? n : f->keep;
    Py_ssize_t size = f->s != NULL ? json_ascii_size(f->s, from_s) : from_s;
    return size + (n - from_s); /* the marker: ASCII with no escape */
}

static Py_ssize_t field_length(struct line_field *f)
{
    return f->keep + (f->cut ? put_marker(NULL, f->lost) : 0);
}

static char *put_field(char *out, struct line_field *f, int *escaped)
{
    if (f->s == NULL) {
        *out++ = '"';
        memcpy(out, f->ascii, f->keep);
        out += f->keep;
        *out++ = '"';
    } else
        out = json_ascii(out, f->s, f->keep, escaped);
    if (f->cut) {
        out -= 1; /* the closing quote, written again after the marker */
        out += put_marker(out, f->lost);
        *out++ = '"';
    }
    return out;
}

/* What _water_level returns: the largest C with sum(min(s, C)) <= room, `sizes` sorted. */
static Py_ssize_t water_level(const Py_ssize_t *sizes, int count, Py_ssize_t room)
{
    int left = count;
    for (int i = 0; i < count; i++) {
        if (sizes[i] * left > room)
            return room / left; /* both >= 0: Python's // */
        room -= sizes[i];
        left -= 1;
    }
    return count > 0 ? sizes[count - 1] : 0;
}

static int compare_sizes(const void *a, const void *b)
{
    Py_ssize_t x = *(const Py_ssize_t *)a, y = *(const Py_ssize_t *)b;
    return (x > y) - (x < y);
}

/* _prefix_within: the length of a prefix of the field's value whose JSON form takes at
 * most `limit` bytes (Python's steps, so the same length). */
static Py_ssize_t prefix_within(struct line_field *f, Py_ssize_t limit)
{
    Py_ssize_t length = field_length(f);
    Py_ssize_t n = length < limit ? length : limit;
    while (n > 0) {
        Py_ssize_t size = field_prefix_size(f, n);
        if (size <= limit)
            break;
        n = n * limit / size; /* < n, since size > limit */
    }
    return n;
}

enum { LINE_CONTAINER, LINE_ID, LINE_SYSCALL, LINE_DECISION, LINE_POLICY, LINE_REASON,
       LINE_ERROR, LINE_FIELDS };
#define MARKER_ROOM 24 /* audit._MARKER_ROOM */
#define MAX_CUT_ROUNDS 8 /* audit._MAX_ROUNDS */

/* One line's parts: the numbers written once, the strings as they are to be written. */
struct line_parts {
    char when[32], pid[24], peer_uid[24], tid[24], number[24], latency[32];
    Py_ssize_t when_len, pid_len, peer_len, tid_len, number_len, latency_len, args_len;
    char *args;
    const char *answer;
    int peer, shadow, error;
    struct line_field fields[LINE_FIELDS];
};

/* The line (audit._LINE's text) at `buf`; its length. */
static Py_ssize_t write_line(char *buf, struct line_parts *l, int *escaped)
{
    char *p = buf;
    struct line_field *f = l->fields;
#define PUT(literal) (memcpy(p, literal, sizeof(literal) - 1), p += sizeof(literal) - 1)
#define PUT_TEXT(text, len) (memcpy(p, (text), (len)), p += (len))
    PUT("{\"time\":");
    PUT_TEXT(l->when, l->when_len);
    PUT(",\"container\":");
    p = put_field(p, &f[LINE_CONTAINER], escaped);
    PUT(",\"runtime_pid\":");
    PUT_TEXT(l->pid, l->pid_len);
    if (l->peer) {
        PUT(",\"peer_uid\":");
        PUT_TEXT(l->peer_uid, l->peer_len);
    }
    PUT(",\"tid\":");
    PUT_TEXT(l->tid, l->tid_len);
    PUT(",\"id\":");
    p = put_field(p, &f[LINE_ID], escaped);
    PUT(",\"syscall\":");
    p = put_field(p, &f[LINE_SYSCALL], escaped);
    PUT(",\"args\":[");
    PUT_TEXT(l->args, l->args_len);
    PUT("],\"decision\":");
    p = put_field(p, &f[LINE_DECISION], escaped);
    if (l->answer != NULL) {
        PUT_TEXT(l->answer, (Py_ssize_t)strlen(l->answer));
        PUT_TEXT(l->number, l->number_len);
    }
    PUT(",\"policy\":");
    p = put_field(p, &f[LINE_POLICY], escaped);
    PUT(",\"reason\":");
    p = put_field(p, &f[LINE_REASON], escaped);
    PUT(",\"latency_us\":");
    PUT_TEXT(l->latency, l->latency_len);
    if (l->error) {
        PUT(",\"error\":");
        p = put_field(p, &f[LINE_ERROR], escaped);
    }
    if (l->shadow)
        PUT(",\"shadow\":true");
    PUT("}\n");
#undef PUT
#undef PUT_TEXT
    return p - buf;
}

/* audit._dumps's cut of a line of `n` bytes over `max_line`, step by step (the same
 * rounds, water level and prefixes, so the same text): the line rewritten at `buf`, its
 * new length. */
static Py_ssize_t cut_line(char *buf, struct line_parts *l, Py_ssize_t max_line, Py_ssize_t n)
{
    struct line_field *f = l->fields;
    int escaped = 0;
    for (int round = 0; round < MAX_CUT_ROUNDS; round++) {
        if (n <= max_line)
            return n;
        Py_ssize_t sizes[LINE_FIELDS], sorted[LINE_FIELDS], total = 0;
        int count = 0, cuttable[LINE_FIELDS];
        for (int i = 0; i < LINE_FIELDS; i++) {
            /* a str value, not empty (the error field only when the line has one) */
            cuttable[i] = (i != LINE_ERROR || l->error) && field_length(&f[i]) > 0;
            if (!cuttable[i])
                continue;
            sizes[i] = field_prefix_size(&f[i], field_length(&f[i]));
            sorted[count++] = sizes[i];
            total += sizes[i];
        }
        if (count == 0)
            break;
        Py_ssize_t room = total - (n - max_line) - MARKER_ROOM * count;
        qsort(sorted, count, sizeof(sorted[0]), compare_sizes);
        Py_ssize_t cap = water_level(sorted, count, room > 0 ? room : 0);
        for (int i = 0; i < LINE_FIELDS; i++) {
            if (!cuttable[i] || sizes[i] <= cap)
                continue;
            Py_ssize_t value_length = field_length(&f[i]);
            Py_ssize_t keep = prefix_within(&f[i], cap - MARKER_ROOM > 0 ? cap - MARKER_ROOM : 0);
            if (keep >= value_length)
                keep = value_length - 1; /* always progress */
            /* f"{original[:keep]}...[{len(original) - keep} more]" */
            f[i].lost = f[i].length - keep;
            f[i].keep = keep < f[i].length ? keep : f[i].length;
            f[i].cut = 1;
        }
        n = write_line(buf, l, &escaped);
    }
    if (n > max_line) { /* every string a bare marker */
        for (int i = 0; i < LINE_FIELDS; i++) {
            f[i].keep = 0;
            f[i].lost = f[i].length;
            f[i].cut = 1;
        }
        n = write_line(buf, l, &escaped);
    }
    return n;
}

PyDoc_STRVAR(format_audit_line_doc,
"format_audit_line(entry, max_line) -> str | None\n\n"
"audit.audit_text's direct formatting of one decision's line, or None where audit_text\n"
"takes its general path.");

static PyObject *format_audit_line(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "format_audit_line(entry, max_line)");
        return NULL;
    }
    /* audit_text unpacks any 9-item iterable (and raises its own ValueError for another
     * length) and compares any number with a length: what is not an exact 9-tuple and an
     * int that fits a Py_ssize_t is its business, not an error here. */
    if (!PyTuple_CheckExact(argv[0]) || PyTuple_GET_SIZE(argv[0]) != 9 ||
        !PyLong_CheckExact(argv[1]))
        Py_RETURN_NONE;
    Py_ssize_t max_line = PyLong_AsSsize_t(argv[1]);
    if (max_line == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *const *e = &PyTuple_GET_ITEM(argv[0], 0);
    PyObject *when = e[0], *container = e[1], *tid = e[2], *notif_id = e[3],
             *syscall = e[4], *args = e[5], *outcome = e[6], *latency = e[7],
             *shadow = e[8];
    /* New references, released at `done`. */
    PyObject *cid = NULL, *pid = NULL, *peer_uid = NULL, *decision = NULL, *policy = NULL,
             *detail = NULL, *error = NULL, *kind = NULL, *number = NULL, *reason = NULL,
             *result = NULL;
    char *buf = NULL;
    struct line_parts parts = {0};
    if (!PyFloat_CheckExact(when) || !PyFloat_CheckExact(latency))
        Py_RETURN_NONE;
    double when_s = PyFloat_AS_DOUBLE(when), latency_us = PyFloat_AS_DOUBLE(latency) * 1e6;
    /* audit_text's ranges for one float-to-decimal conversion (NaN fails both). */
    if (!(1e9 <= when_s && when_s < 4e9) || !(0.0 <= latency_us && latency_us < 1e12))
        Py_RETURN_NONE;
    if ((cid = PyObject_GetAttr(container, f_names[F_ID])) == NULL ||
        (pid = PyObject_GetAttr(container, f_names[F_PID])) == NULL ||
        (peer_uid = PyObject_GetAttr(container, f_names[F_PEER_UID])) == NULL ||
        (decision = PyObject_GetAttr(outcome, f_names[F_DECISION])) == NULL ||
        (policy = PyObject_GetAttr(outcome, f_names[F_POLICY])) == NULL ||
        (detail = PyObject_GetAttr(outcome, f_names[F_DETAIL])) == NULL ||
        (error = PyObject_GetAttr(outcome, f_names[F_ERROR])) == NULL ||
        (kind = PyObject_GetAttr(decision, f_names[F_KIND])) == NULL)
        goto done;
    /* reason = outcome.detail or decision.reason: only a str detail is judged here. */
    if (!PyUnicode_CheckExact(detail))
        goto none;
    if (PyUnicode_GET_LENGTH(detail) > 0) {
        reason = detail;
        Py_INCREF(reason);
    } else if ((reason = PyObject_GetAttr(decision, f_names[F_REASON])) == NULL)
        goto done;
    if (!PyLong_CheckExact(pid) || !PyLong_CheckExact(tid) || !PyLong_CheckExact(notif_id) ||
        (peer_uid != Py_None && !PyLong_CheckExact(peer_uid)) ||
        !PyUnicode_CheckExact(reason) || !PyUnicode_CheckExact(syscall) ||
        !PyUnicode_CheckExact(cid) || !PyUnicode_CheckExact(policy) ||
        !PyUnicode_CheckExact(kind) || (error != Py_None && !PyUnicode_CheckExact(error)) ||
        (shadow != Py_True && shadow != Py_False) ||
        (!PyTuple_CheckExact(args) && !PyList_CheckExact(args)))
        goto none;
    const char *answer = NULL;
    if (PyUnicode_CompareWithASCIIString(kind, "deny") == 0) {
        answer = ",\"errno\":";
        number = PyObject_GetAttr(decision, f_names[F_ERRNO]);
    } else if (PyUnicode_CompareWithASCIIString(kind, "returns") == 0) {
        answer = ",\"value\":";
        number = PyObject_GetAttr(decision, f_names[F_VALUE]);
    }
    if (answer != NULL && number == NULL)
        goto done;
    if (answer != NULL && !PyLong_CheckExact(number))
        goto none;
    PyObject *strings[] = {cid, syscall, kind, policy, reason, error};
    for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++)
        if (strings[i] != Py_None && PyUnicode_READY(strings[i]) < 0)
            goto done;
    /* The numbers, written once: f"{when:.6f}".rstrip("0") (and "0" back after a bare
     * "."), the ints as audit_text's % writes them, the latency to one decimal. */
    parts.answer = answer;
    parts.peer = peer_uid != Py_None;
    parts.shadow = shadow == Py_True;
    int ok;
#define PUT_INT(v, hex, out, out_len)                                                  \
    do {                                                                               \
        if ((ok = int_text((out), (v), (hex), &(out_len))) < 0)                        \
            goto done;                                                                 \
        if (ok == 0)                                                                   \
            goto none;                                                                 \
    } while (0)
    if ((parts.when_len = put_fixed(parts.when, when_s, 6)) < 0)
        goto done;
    while (parts.when[parts.when_len - 1] == '0')
        parts.when_len--;
    if (parts.when[parts.when_len - 1] == '.')
        parts.when[parts.when_len++] = '0';
    PUT_INT(pid, 0, parts.pid, parts.pid_len);
    if (parts.peer)
        PUT_INT(peer_uid, 0, parts.peer_uid, parts.peer_len);
    PUT_INT(tid, 0, parts.tid, parts.tid_len);
    if (answer != NULL)
        PUT_INT(number, 0, parts.number, parts.number_len);
    if ((parts.latency_len = put_fixed(parts.latency, latency_us, 1)) < 0)
        goto done;
    Py_ssize_t n_args = PySequence_Fast_GET_SIZE(args), len;
    /* per argument "0x" + 16 digits + 2 quotes + 1 comma = 21 */
    if ((parts.args = PyMem_Malloc(n_args * 21 + 1)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject **items = PySequence_Fast_ITEMS(args);
    char *a = parts.args;
    for (Py_ssize_t i = 0; i < n_args; i++) {
        if (!PyLong_CheckExact(items[i]))
            goto none;
        if (i > 0)
            *a++ = ',';
        *a++ = '"';
        PUT_INT(items[i], 1, a, len);
        a += len;
        *a++ = '"';
    }
    parts.args_len = a - parts.args;
#undef PUT_INT
    /* The strings, in the line's order (the order audit._dumps cuts them in). */
    struct line_field *f = parts.fields;
    PyObject *in_order[] = {cid, NULL, syscall, kind, policy, reason, error};
    for (size_t i = 0; i < LINE_FIELDS; i++) {
        f[i].s = in_order[i];
        f[i].cut = 0;
        f[i].lost = 0;
        if (i == LINE_ID) {
            if ((ok = int_text(f[i].ascii, notif_id, 1, &f[i].length)) < 0)
                goto done;
            if (ok == 0)
                goto none;
        } else
            f[i].length = f[i].s == Py_None ? 0 : PyUnicode_GET_LENGTH(f[i].s);
        f[i].keep = f[i].length;
    }
    parts.error = error != Py_None;
    /* Everything but the strings (whose quotes json_ascii_bound counts): the keys and
     * punctuation (164 bytes with every optional field), the numbers (at most 21 bytes
     * each), the two floats (at most 24), the arguments, and room for a marker (at most
     * 26 bytes) after every string cut. */
    Py_ssize_t bound = 200 + 4 * 24 + 2 * 24 + parts.args_len + LINE_FIELDS * (24 + 32);
    for (size_t i = 0; i < LINE_FIELDS; i++)
        if (f[i].s != NULL && f[i].s != Py_None)
            bound += json_ascii_bound(f[i].s);
    if ((buf = PyMem_Malloc(bound)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int escaped = 0;
    Py_ssize_t n = write_line(buf, &parts, &escaped);
    /* audit_text's test: a surrogate to replace (json writes U+D800-U+DFFF, and every
     * character above U+FFFF, as "\udXXX" escapes). Only an escape writes a backslash. */
    if (escaped && memmem(buf, n, "\\ud", 3) != NULL)
        goto none;
    if (max_line > 0 && n > max_line)
        n = cut_line(buf, &parts, max_line, n);
    if ((result = PyUnicode_New(n, 127)) == NULL)
        goto done;
    memcpy(PyUnicode_1BYTE_DATA(result), buf, n);
    goto done;
none:
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(buf);
    PyMem_Free(parts.args);
    Py_XDECREF(cid);
    Py_XDECREF(pid);
    Py_XDECREF(peer_uid);
    Py_XDECREF(decision);
    Py_XDECREF(policy);
    Py_XDECREF(detail);
    Py_XDECREF(error);
    Py_XDECREF(kind);
    Py_XDECREF(number);
    Py_XDECREF(reason);
    return result;
}

static int format_audit_line_init(void)
{
    static const char *const names[F_NAMES] = {"id", "pid", "peer_uid", "decision", "policy",
                                               "detail", "error", "kind", "errno", "value",
                                               "reason"};
    for (int c = 0; c < 256; c++)
        json_extra[c] = c >= 0x20 && c < 0x7f ? 0 : 5;
    json_extra['"'] = json_extra['\\'] = json_extra['\n'] = json_extra['\r'] = 1;
    json_extra['\t'] = json_extra['\b'] = json_extra['\f'] = 1;
    for (int i = 0; i < F_NAMES; i++)
        if (f_names[i] == NULL && (f_names[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return -1;
    return 0;
}

/* ------------------------------------------------------------------ a plain path
 *
 * policy.normalised_path's test, whether lexical normalisation would leave a path as
 * it is: no "//", no "/." (a component "." or "..", or one that merely starts with a
 * dot: normalised anyway, which leaves it), no trailing "/". In Python that is two
 * substring searches, which for two-byte needles go about a byte a nanosecond (CPython
 * 3.11's default_find): 2.5 us for a 4,000-byte path, a tenth of a guarded call. Here
 * memchr finds each "/" and the byte after it is looked at. */

PyDoc_STRVAR(plain_path_doc,
"plain_path(path) -> bool\n--\n\n"
"True if bytes `path` has no b\"//\", no b\"/.\" and does not end with b\"/\".");

static PyObject *plain_path(PyObject *module, PyObject *path)
{
    if (!PyBytes_Check(path)) {
        PyErr_Format(PyExc_TypeError, "plain_path() needs bytes, not %.100s",
                     Py_TYPE(path)->tp_name);
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(path), *end = s + PyBytes_GET_SIZE(path);
    if (end > s && end[-1] == '/')
        Py_RETURN_FALSE;
    for (const char *slash = s; (slash = memchr(slash, '/', end - slash)) != NULL;) {
        if (++slash < end && (*slash == '/' || *slash == '.'))
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------------- Signal
 *
 * A flag for one waiting thread that spins before it sleeps (supervisor/memory.py:
 * the reading thread's wake-up, and the event loop's inline wait for a read). On the
 * machines we measured, a thread's sleep and wake-up costs 20-40 us of CPU (a virtual
 * CPU's timer and IPI exits), more than the read it waits for; a short spin with the GIL
 * released costs less and answers in well under a microsecond. The pure-Python twin is
 * memory._PySignal (a Lock: no spin). */

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

enum { SIGNAL_CLEAR = 0, SIGNAL_SET = 1, SIGNAL_SLEEPING = 2 /* clear, its waiter in futex */ };

typedef struct {
    PyObject_HEAD
    _Atomic uint32_t state;
    _Atomic int spinner_cpu; /* the CPU its waiter spins on, -1 while it does not spin */
} SignalObject;

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void signal_raise(SignalObject *s)
{
    if (atomic_exchange(&s->state, SIGNAL_SET) == SIGNAL_SLEEPING)
        syscall(SYS_futex, &s->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Called without the GIL. 1 if the flag was set (it is cleared), 0 at the timeout
 * (timeout < 0: none). Spins up to `spin` seconds first. */
static int signal_wait_released(SignalObject *s, double timeout, double spin)
{
    double start = monotonic_seconds();
    if (spin > 0) {
        double until = start + (timeout >= 0 && timeout < spin ? timeout : spin);
        atomic_store(&s->spinner_cpu, sched_getcpu());
        for (unsigned i = 1;; i++) {
            if (atomic_load_explicit(&s->state, memory_order_acquire) == SIGNAL_SET &&
                atomic_exchange(&s->state, SIGNAL_CLEAR) == SIGNAL_SET) {
                atomic_store(&s->spinner_cpu, -1);
                return 1;
            }
            CPU_RELAX();
            if ((i & 31) == 0 && monotonic_seconds() >= until)
                break;
        }
        atomic_store(&s->spinner_cpu, -1);
    }
    for (;;) {
        uint32_t expected = SIGNAL_CLEAR;
        if (!atomic_compare_exchange_strong(&s->state, &expected, SIGNAL_SLEEPING) &&
            expected == SIGNAL_SET) {
            if (atomic_exchange(&s->state, SIGNAL_CLEAR) == SIGNAL_SET)
                return 1;
            continue;
        }
        struct timespec ts, *until = NULL;
        if (timeout >= 0) {
            double left = start + timeout - monotonic_seconds();
            if (left <= 0) {
                expected = SIGNAL_SLEEPING;
                if (atomic_compare_exchange_strong(&s->state, &expected, SIGNAL_CLEAR) ||
                    expected != SIGNAL_SET)
                    return 0;
                return atomic_exchange(&s->state, SIGNAL_CLEAR) == SIGNAL_SET;
            }
            ts.tv_sec = (time_t)left;
            ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
            until = &ts;
        }
        syscall(SYS_futex, &s->state, FUTEX_WAIT_PRIVATE, SIGNAL_SLEEPING, until, NULL, 0);
    }
}

static int signal_wait_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t first,
                            double *timeout, double *spin)
{
    *timeout = -1.0;
    *spin = 0.0;
    if (nargs > first && (*timeout = PyFloat_AsDouble(args[first])) == -1.0 && PyErr_Occurred())
        return -1;
    if (nargs > first + 1 && (*spin = PyFloat_AsDouble(args[first + 1])) == -1.0 &&
        PyErr_Occurred())
        return -1;
    if (nargs > first + 2) {
        PyErr_SetString(PyExc_TypeError, "too many arguments");
        return -1;
    }
    return 0;
}

static PyObject *signal_wait_common(SignalObject *waited, SignalObject *raised, double timeout,
                                    double spin)
{
    int got;
    if (raised == NULL && atomic_load(&waited->state) == SIGNAL_SET &&
        atomic_exchange(&waited->state, SIGNAL_CLEAR) == SIGNAL_SET)
        Py_RETURN_TRUE;
    Py_BEGIN_ALLOW_THREADS
    if (raised != NULL)
        signal_raise(raised);
    got = signal_wait_released(waited, timeout, spin);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(got);
}

static PyObject *Signal_set(SignalObject *self, PyObject *unused)
{
    signal_raise(self);
    Py_RETURN_NONE;
}

static PyObject *Signal_wait(SignalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double timeout, spin;
    if (signal_wait_args(args, nargs, 0, &timeout, &spin) < 0)
        return NULL;
    return signal_wait_common(self, NULL, timeout, spin);
}

static PyObject *Signal_spinning_elsewhere(SignalObject *self, PyObject *unused)
{
    int cpu = atomic_load(&self->spinner_cpu);
    return PyBool_FromLong(cpu >= 0 && cpu != sched_getcpu());
}

static PyTypeObject SignalType;

static PyObject *Signal_set_then_wait(SignalObject *self, PyObject *const *args,
                                      Py_ssize_t nargs)
{
    double timeout, spin;
    if (nargs < 1 || Py_TYPE(args[0]) != &SignalType) {
        PyErr_SetString(PyExc_TypeError, "set_then_wait(other: Signal, timeout, spin)");
        return NULL;
    }
    if (signal_wait_args(args, nargs, 1, &timeout, &spin) < 0)
        return NULL;
    return signal_wait_common((SignalObject *)args[0], self, timeout, spin);
}

static PyMethodDef Signal_methods[] = {
    {"set", (PyCFunction)Signal_set, METH_NOARGS,
     "set()\n--\n\nSet the flag and wake its waiter (any thread)."},
    {"wait", (PyCFunction)(void (*)(void))Signal_wait, METH_FASTCALL,
     "wait(timeout=-1.0, spin=0.0)\n--\n\nWait (the GIL released) until the flag is set, "
     "spinning up to spin seconds first; clear it. False at the timeout (< 0: none). One "
     "waiting thread at a time."},
    {"spinning_elsewhere", (PyCFunction)Signal_spinning_elsewhere, METH_NOARGS,
     "spinning_elsewhere()\n--\n\nTrue if this flag's waiter is spinning for it on another "
     "CPU than the caller's: then it runs, and a wait for what it does next may spin too "
     "(on the same CPU, the caller has preempted it)."},
    {"set_then_wait", (PyCFunction)(void (*)(void))Signal_set_then_wait, METH_FASTCALL,
     "set_then_wait(other, timeout=-1.0, spin=0.0)\n--\n\nRelease the GIL, then set this "
     "flag and other.wait(timeout, spin): the thread woken finds the GIL free."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Signal_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Signal() takes no arguments");
        return NULL;
    }
    SignalObject *self = (SignalObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        atomic_init(&self->state, SIGNAL_CLEAR);
        atomic_init(&self->spinner_cpu, -1);
    }
    return (PyObject *)self;
}

static PyTypeObject SignalType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._hotloop.Signal",
    .tp_basicsize = sizeof(SignalObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A flag one thread waits for, spinning before it sleeps.",
    .tp_new = Signal_new,
    .tp_methods = Signal_methods,
};

/* ------------------------------------------------------------------ ReadBatch
 *
 * The reading thread of supervisor/memory.py reads the paths of a run of queued jobs
 * (ReadPool: read_cstrings_soon's jobs, through process_vm_readv) in one call that lets
 * go of the GIL once. Read one job at a time in Python, it needed the GIL back after
 * every process_vm_readv, while the event loop held it: at 100 busy targets every read
 * cost a hand-over of the GIL each way, a thread's sleep and wake-up (bench/README.md,
 * "Session 11"). Its twin, memory._PyReadBatch, is the reference.
 *
 * A job's read can block for ever (a userfaultfd page nobody serves, a FUSE mapping), so
 * the thread claims the jobs one at a time, and the event loop can stop() a batch whose
 * run lasts too long: the jobs not claimed yet go back to the queue, those read already
 * are take()n and delivered by the loop, and the one being read stays with its thread.
 * Each job's state moves UNCLAIMED -> READING -> DONE (the thread, no GIL) -> TAKEN
 * (take(), by whichever thread asks first: exactly once, as take() holds the GIL), or
 * UNCLAIMED -> STOPPED (stop()). The thread claims jobs in order, so the claimed ones
 * are always the first. */
#include <sys/uio.h>

enum { JOB_UNCLAIMED, JOB_READING, JOB_DONE, JOB_TAKEN, JOB_STOPPED };
/* A string's status: 0 read (data, length), or EFAULT (unmapped memory, or a NULL
 * address), or ENAMETOOLONG (no NUL within the job's limit). */
struct batch_string {
    unsigned long long address;
    int status;
    size_t length;
    char *data; /* malloc'ed; NULL until read, and once taken */
};
struct batch_job {
    pid_t tid;
    size_t limit;
    Py_ssize_t first, count; /* its strings */
    int error;               /* an errno other than EFAULT from process_vm_readv: the job
                              * failed as a whole (ESRCH, EPERM), as _Reader.read raises */
    _Atomic int state;
};
/* What a job's limit may be: the session reads PATH_MAX (4,096) bytes at most. */
#define BATCH_MAX_LIMIT (1 << 20)

typedef struct {
    PyObject_HEAD
    Py_ssize_t n, n_strings;
    struct batch_job *jobs;
    struct batch_string *strings;
    char *scratch;
    size_t scratch_size;
    _Atomic int ran; /* run() was called */
} ReadBatchObject;

static PyTypeObject ReadBatchType;

static void ReadBatch_dealloc(ReadBatchObject *self)
{
    for (Py_ssize_t i = 0; self->strings != NULL && i < self->n_strings; i++)
        free(self->strings[i].data);
    PyMem_Free(self->strings);
    PyMem_Free(self->jobs);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ReadBatch_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *requests;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "ReadBatch() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!:ReadBatch", &PyList_Type, &requests))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(requests), n_strings = 0;
    size_t largest = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *req = PyList_GET_ITEM(requests, i);
        /* The tid an int: a non-int's __index__ (Python code, in the loop below) could
         * change the list after its strings were counted here. */
        if (!PyTuple_CheckExact(req) || PyTuple_GET_SIZE(req) != 3 ||
            !PyLong_Check(PyTuple_GET_ITEM(req, 0)) ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(req, 1))) {
            PyErr_SetString(PyExc_TypeError,
                            "a request is (tid, tuple of addresses, limit)");
            return NULL;
        }
        n_strings += PyTuple_GET_SIZE(PyTuple_GET_ITEM(req, 1));
    }
    ReadBatchObject *self = (ReadBatchObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->n = n;
    self->n_strings = n_strings;
    atomic_store(&self->ran, 0);
    self->jobs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct batch_job));
    self->strings = PyMem_Calloc(n_strings ? (size_t)n_strings : 1,
                                 sizeof(struct batch_string));
    if (self->jobs == NULL || self->strings == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *req = PyList_GET_ITEM(requests, i);
        PyObject *addresses = PyTuple_GET_ITEM(req, 1);
        struct batch_job *job = &self->jobs[i];
        long tid = PyLong_AsLong(PyTuple_GET_ITEM(req, 0));
        if (tid == -1 && PyErr_Occurred())
            goto fail;
        size_t limit = PyLong_AsSize_t(PyTuple_GET_ITEM(req, 2));
        if (limit == (size_t)-1 && PyErr_Occurred())
            goto fail;
        if (tid <= 0 || tid > INT_MAX || limit == 0 || limit > BATCH_MAX_LIMIT) {
            PyErr_Format(PyExc_ValueError, "ReadBatch: tid %ld or limit %zu out of range",
                         tid, limit);
            goto fail;
        }
        job->tid = (pid_t)tid;
        job->limit = limit;
        if (limit > largest)
            largest = limit;
        job->first = k;
        job->count = PyTuple_GET_SIZE(addresses);
        atomic_store(&job->state, JOB_UNCLAIMED);
        for (Py_ssize_t j = 0; j < job->count; j++, k++) {
            self->strings[k].address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(addresses, j));
            if (self->strings[k].address == (unsigned long long)-1 && PyErr_Occurred())
                goto fail;
        }
    }
    self->scratch_size = largest;
    if ((self->scratch = PyMem_Malloc(largest)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

/* One NUL-terminated string of thread `tid`'s, at most `limit` bytes read into `buf`,
 * without the GIL: as _Reader.read_cstring reads it, page by page. 0, or an errno that
 * fails the whole job. */
static int read_string(char *buf, pid_t tid, size_t limit, struct batch_string *string)
{
    const size_t page = 4096; /* a page or less per read: an unmapped page must not hide
                               * the readable ones before it (as memory.PAGE_SIZE) */
    unsigned long long address = string->address;
    if (address == 0) {
        string->status = EFAULT;
        return 0;
    }
    size_t length = 0;
    string->status = ENAMETOOLONG;
    while (length < limit) {
        unsigned long long at = address + length;
        if (at < address) { /* past the top of the address space */
            string->status = EFAULT;
            break;
        }
        size_t chunk = limit - length, to_page = page - (size_t)(at % page);
        if (chunk > to_page)
            chunk = to_page;
        struct iovec local = {buf + length, chunk};
        struct iovec remote = {(void *)(uintptr_t)at, chunk};
        ssize_t got = process_vm_readv(tid, &local, 1, &remote, 1, 0);
        if (got < 0) {
            if (errno != EFAULT)
                return errno;
            got = 0;
        }
        char *nul = memchr(buf + length, 0, (size_t)got);
        if (nul != NULL) {
            length = (size_t)(nul - buf);
            string->status = 0;
            break;
        }
        length += (size_t)got;
        if ((size_t)got < chunk) {
            string->status = EFAULT;
            break;
        }
    }
    if (string->status == 0) {
        if ((string->data = malloc(length ? length : 1)) == NULL)
            return ENOMEM;
        memcpy(string->data, buf, length);
        string->length = length;
    }
    return 0;
}

PyDoc_STRVAR(ReadBatch_run_doc,
"run() -> int\n--\n\n"
"Read the jobs in order, the GIL released, until all are read or stop() was called;\n"
"the number of jobs claimed (0 .. that number - 1: take() them). Once per batch.");

static PyObject *ReadBatch_run(ReadBatchObject *self, PyObject *unused)
{
    if (atomic_exchange(&self->ran, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "a ReadBatch runs once");
        return NULL;
    }
    Py_ssize_t claimed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < self->n; i++) {
        struct batch_job *job = &self->jobs[i];
        int expected = JOB_UNCLAIMED;
        if (!atomic_compare_exchange_strong(&job->state, &expected, JOB_READING))
            break; /* stopped */
        claimed = i + 1;
        for (Py_ssize_t j = 0; j < job->count && job->error == 0; j++)
            job->error = read_string(self->scratch, job->tid, job->limit,
                                     &self->strings[job->first + j]);
        atomic_store_explicit(&job->state, JOB_DONE, memory_order_release);
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(claimed);
}

PyDoc_STRVAR(ReadBatch_stop_doc,
"stop() -> int\n--\n\n"
"No more jobs are claimed; the number claimed already (the others were never read).");

static PyObject *ReadBatch_stop(ReadBatchObject *self, PyObject *unused)
{
    Py_ssize_t claimed = self->n;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        int expected = JOB_UNCLAIMED;
        if (atomic_compare_exchange_strong(&self->jobs[i].state, &expected, JOB_STOPPED) ||
            expected == JOB_STOPPED) {
            if (claimed == self->n)
                claimed = i; /* the first one not claimed: none after it is either */
        }
    }
    return PyLong_FromSsize_t(claimed);
}

/* Job number `arg` of `self`, or -1 with an exception set. */
static Py_ssize_t batch_index(ReadBatchObject *self, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "ReadBatch: no such job");
        return -1;
    }
    return i;
}

/* A job's result as take() hands it out: -error if it failed as a whole, else per string
 * the bytes or its status. The strings' data is freed either way. */
static PyObject *strings_result(struct batch_string *strings, Py_ssize_t count, int error)
{
    PyObject *result = error != 0 ? PyLong_FromLong(-error) : PyList_New(count);
    for (Py_ssize_t j = 0; j < count; j++) {
        struct batch_string *string = &strings[j];
        if (result != NULL && error == 0) {
            PyObject *value = string->status == 0
                ? PyBytes_FromStringAndSize(string->data, (Py_ssize_t)string->length)
                : PyLong_FromLong(string->status);
            if (value == NULL)
                Py_CLEAR(result);
            else
                PyList_SET_ITEM(result, j, value);
        }
        free(string->data);
        string->data = NULL;
    }
    return result;
}

PyDoc_STRVAR(ReadBatch_take_doc,
"take(i) -> list | int | None\n--\n\n"
"Job i's result, once: None if it is not read yet, or was taken. A negative errno if\n"
"the job failed as a whole; else per address the bytes, or EFAULT / ENAMETOOLONG.");

static PyObject *ReadBatch_take(ReadBatchObject *self, PyObject *arg)
{
    Py_ssize_t i = batch_index(self, arg);
    if (i < 0)
        return NULL;
    struct batch_job *job = &self->jobs[i];
    int expected = JOB_DONE;
    if (!atomic_compare_exchange_strong(&job->state, &expected, JOB_TAKEN))
        Py_RETURN_NONE;
    return strings_result(&self->strings[job->first], job->count, job->error);
}

PyDoc_STRVAR(ReadBatch_busy_doc,
"busy(i) -> bool\n--\n\n"
"Whether job i is being read.");

static PyObject *ReadBatch_busy(ReadBatchObject *self, PyObject *arg)
{
    Py_ssize_t i = batch_index(self, arg);
    if (i < 0)
        return NULL;
    return PyBool_FromLong(atomic_load(&self->jobs[i].state) == JOB_READING);
}

static Py_ssize_t ReadBatch_len(ReadBatchObject *self)
{
    return self->n;
}

static PyMethodDef ReadBatch_methods[] = {
    {"run", (PyCFunction)ReadBatch_run, METH_NOARGS, ReadBatch_run_doc},
    {"stop", (PyCFunction)ReadBatch_stop, METH_NOARGS, ReadBatch_stop_doc},
    {"take", (PyCFunction)ReadBatch_take, METH_O, ReadBatch_take_doc},
    {"busy", (PyCFunction)ReadBatch_busy, METH_O, ReadBatch_busy_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods ReadBatch_as_sequence = {
    .sq_length = (lenfunc)ReadBatch_len,
};

static PyTypeObject ReadBatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._hotloop.ReadBatch",
    .tp_basicsize = sizeof(ReadBatchObject),
    .tp_dealloc = (destructor)ReadBatch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ReadBatch(requests): paths of queued reads, read in one run without the GIL.\n"
              "requests: a list of (tid, tuple of addresses, limit).",
    .tp_new = ReadBatch_new,
    .tp_methods = ReadBatch_methods,
    .tp_as_sequence = &ReadBatch_as_sequence,
};

/* ---------------------------------------------------------------- InlineReader
 *
 * A read the event loop waits for inline (memory.ReadPool.submit with a wait: one to a
 * few listener fds served), done by a thread of its own that never takes the GIL. Given
 * to the pool's Python reading thread, the same read took that thread's wake-up into
 * Python, its job bookkeeping and two hand-overs of the GIL: at one busy guarded
 * container, a call's p50 was 26 us, 18 us with the read made (unsafely) on the loop's
 * own thread, and the daemon's CPU per call 36 against 17 us (bench/README.md,
 * "Session 16"). Here the loop writes the request into shared memory, wakes the thread
 * (or finds it spinning), and waits with the GIL released: it spins unless the thread
 * last ran on the loop's own CPU (see inline_main for who gives way). A read not done
 * within the wait is abandoned: the thread finishes it alone (or stays stuck in it: a
 * userfaultfd page nobody serves) and read() answers False until it is back; the pool
 * then gives the next reads to another reader (memory.ReadPool._inline_abandoned), or
 * past MAX_STUCK_READS to its own path. At most one thread is in an abandoned read per
 * reader. No Python object is ever shared with the thread; the shared
 * state is freed by whichever of the object and the thread lets go of it last. Its twin
 * with the pure-Python hot loop is the pool's own inline wait. */

enum { INLINE_IDLE, INLINE_POSTED, INLINE_DONE, INLINE_ABANDONED };
/* The largest limit a request may have: the daemon reads PATH_MAX (4,096) bytes. */
#define INLINE_MAX_LIMIT 65536
/* `posted`: the count of requests written, and the flag that no more come. */
#define POSTED_COUNT 0x7FFFFFFFu
#define POSTED_CLOSED 0x80000000u
/* Seconds the thread spins for the next request of a batch still open (a poll round
 * going on) before it sleeps until the loop posts one or closes the batch. */
#define INLINE_POST_SPIN 100e-6

/* Seconds between two sched_yield()s of the thread while it spins. A task woken on the
 * CPU it spins on (the loop, a target) did not always preempt it at once, although it
 * runs 10 nice levels below them: at one busy guarded container 1% of the calls took
 * ~240 us, ~130 us with these yields (p50 unchanged; bench/README.md, "Session 16"). */
#define INLINE_YIELD_EVERY 30e-6

struct inline_shared {
    /* The one futex word: IDLE -> POSTED (the loop), POSTED -> DONE (the thread) or
     * POSTED -> ABANDONED (the loop, at its timeout), DONE -> IDLE (the loop, taking the
     * result), ABANDONED -> IDLE (the thread, its read over, or as soon as it runs if
     * the loop gave up before the thread saw the batch at all). One side waits on it at
     * a time: the thread while it is neither POSTED nor ABANDONED, the loop while it is
     * POSTED. */
    _Atomic uint32_t phase;
    _Atomic int loop_sleeping, thread_sleeping, closing, refs;
    /* The CPU the thread last ran on, -1 while it sleeps; the loop's when it last
     * posted (see inline_main: who gives way when they share one). */
    _Atomic int thread_cpu, loop_cpu;
    double spin;            /* how long the thread spins for its next request */
    int nice;               /* the thread's nice value */
    /* The requests, read by the thread in order while POSTED. `posted` (a futex word)
     * counts those the loop has written (each before it is counted), with POSTED_CLOSED
     * once no more come: all of them before the batch is posted (read, read_many), or
     * one by one while the thread reads the first ones (a poll round, round_collect).
     * `n_requests`: their number, once closed. `done` counts those read so far: each is
     * the loop's once counted (the thread does not touch it again), also after an
     * abandonment. `taken`: how many the loop took when it abandoned the rest (the
     * thread frees the strings of the others). `thread_waiting`: the thread sleeps on
     * `posted` for the next request of the batch. */
    _Atomic uint32_t posted;
    _Atomic int thread_waiting;
    Py_ssize_t n_requests, taken;
    _Atomic Py_ssize_t begun, done;
    struct inline_request {
        pid_t tid;
        size_t limit;
        Py_ssize_t first, count;
        int error;
        double seconds; /* how long its read took */
    } requests[INLINE_MAX_REQUESTS];
    struct batch_string strings[INLINE_MAX_ALL_STRINGS];
    char scratch[INLINE_MAX_LIMIT];
};

typedef struct {
    PyObject_HEAD
    struct inline_shared *shared; /* NULL once closed */
    int started;                  /* the thread runs */
    unsigned long generation;     /* inline_fork_generation when the thread started */
    unsigned long long reads, abandoned;
    /* The CPU the thread was on (-1: asleep) when the batch open now was posted, before
     * the loop woke it: inline_close_wait spins unless it is the loop's own. */
    int open_cpu;
} InlineReaderObject;

/* Bumped in a forked child: a reader made before the fork has no thread there. */
static unsigned long inline_fork_generation;

static void inline_forked(void)
{
    inline_fork_generation++;
}

static void inline_release(struct inline_shared *shared)
{
    if (atomic_fetch_sub(&shared->refs, 1) == 1) {
        for (int i = 0; i < INLINE_MAX_ALL_STRINGS; i++)
            free(shared->strings[i].data);
        free(shared);
    }
}

static void futex_wake_all(_Atomic uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* The thread, between two requests of a batch still open: until `posted` is no
 * longer `word` (a request, or the batch closed), the batch is abandoned or the reader
 * closed; spinning a while (yielding as below), then asleep on `posted`. */
static void inline_wait_post(struct inline_shared *shared, uint32_t word)
{
    /* On the loop's CPU it would spin where the loop must run to post: asleep at once. */
    double now = monotonic_seconds();
    double until = sched_getcpu() == atomic_load(&shared->loop_cpu) ? now
                                                                   : now + INLINE_POST_SPIN;
    double next_yield = now + INLINE_YIELD_EVERY;
    for (unsigned i = 1;; i++) {
        if (atomic_load(&shared->posted) != word || atomic_load(&shared->closing) ||
            atomic_load(&shared->phase) != INLINE_POSTED)
            return;
        CPU_RELAX();
        if ((i & 31) == 0) {
            now = monotonic_seconds();
            if (now >= until)
                break;
            if (now >= next_yield) {
                sched_yield();
                next_yield = now + INLINE_YIELD_EVERY;
            }
        }
    }
    atomic_store(&shared->thread_waiting, 1);
    if (atomic_load(&shared->posted) == word && !atomic_load(&shared->closing) &&
        atomic_load(&shared->phase) == INLINE_POSTED) {
        atomic_store(&shared->thread_cpu, -1);
        syscall(SYS_futex, &shared->posted, FUTEX_WAIT_PRIVATE, word, NULL, NULL, 0);
        atomic_store(&shared->thread_cpu, sched_getcpu());
    }
    atomic_store(&shared->thread_waiting, 0);
}

static void *inline_main(void *arg)
{
    struct inline_shared *shared = arg;
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), shared->nice) != 0)
        errno = 0; /* (as memory._lower_thread_priority: not being niced is no failure) */
    double spin = 0.0, last = monotonic_seconds();
    for (;;) {
        uint32_t phase;
        atomic_store(&shared->thread_cpu, sched_getcpu());
        if (spin > 0) {
            double now = monotonic_seconds(), until = now + spin;
            double next_yield = now + INLINE_YIELD_EVERY;
            for (unsigned i = 1;; i++) {
                phase = atomic_load_explicit(&shared->phase, memory_order_acquire);
                if (phase == INLINE_POSTED || phase == INLINE_ABANDONED ||
                    atomic_load(&shared->closing))
                    break;
                CPU_RELAX();
                if ((i & 31) == 0) {
                    double now = monotonic_seconds();
                    if (now >= until)
                        break;
                    if (now >= next_yield) {
                        sched_yield();
                        next_yield = now + INLINE_YIELD_EVERY;
                    }
                    atomic_store(&shared->thread_cpu, sched_getcpu()); /* (migrated) */
                }
            }
        }
        for (;;) {
            atomic_store(&shared->thread_sleeping, 1);
            phase = atomic_load(&shared->phase);
            /* ABANDONED: a batch the loop gave up waiting for before this thread saw it
             * posted (woken, or started, too late): only this thread sets it IDLE. */
            if (phase == INLINE_POSTED || phase == INLINE_ABANDONED ||
                atomic_load(&shared->closing))
                break;
            atomic_store(&shared->thread_cpu, -1);
            syscall(SYS_futex, &shared->phase, FUTEX_WAIT_PRIVATE, phase, NULL, NULL, 0);
        }
        atomic_store(&shared->thread_sleeping, 0);
        atomic_store(&shared->thread_cpu, sched_getcpu());
        phase = atomic_load(&shared->phase);
        if (phase != INLINE_POSTED && phase != INLINE_ABANDONED) /* closing */
            break;
        double now = monotonic_seconds();
        /* Spin for the next request only if this one came within a spin of the last. */
        spin = now - last <= shared->spin ? shared->spin : 0.0;
        /* (None read of a batch given up before it began: straight to its release.) */
        for (Py_ssize_t r = 0; phase == INLINE_POSTED;) {
            uint32_t word = atomic_load_explicit(&shared->posted, memory_order_acquire);
            if (r >= (Py_ssize_t)(word & POSTED_COUNT)) {
                if ((word & POSTED_CLOSED) || atomic_load(&shared->closing) ||
                    atomic_load(&shared->phase) != INLINE_POSTED)
                    break; /* all read (or abandoned) */
                inline_wait_post(shared, word); /* more come: the round goes on */
                continue;
            }
            if (r > 0 && atomic_load(&shared->phase) != INLINE_POSTED)
                break; /* abandoned: the rest are not read */
            struct inline_request *req = &shared->requests[r];
            atomic_store(&shared->begun, r + 1);
            double began = monotonic_seconds();
            req->error = 0;
            for (Py_ssize_t j = 0; j < req->count && req->error == 0; j++)
                req->error = read_string(shared->scratch, req->tid, req->limit,
                                         &shared->strings[req->first + j]);
            last = monotonic_seconds();
            req->seconds = last - began;
            atomic_store_explicit(&shared->done, r + 1, memory_order_release);
            r++;
        }
        uint32_t expected = INLINE_POSTED;
        if (atomic_compare_exchange_strong(&shared->phase, &expected, INLINE_DONE)) {
            if (atomic_load(&shared->loop_sleeping)) {
                futex_wake_all(&shared->phase);
                /* The loop, woken, may preempt this thread on this CPU, its own: then
                 * spinning here would keep the two on one CPU, each read costing both
                 * a switch (and the loop could not spin for a thread queued behind
                 * it). Asleep, this thread is woken by the next read where a CPU is
                 * free, and spins there from then on. */
                if (sched_getcpu() == atomic_load(&shared->loop_cpu))
                    spin = 0.0;
            }
        }
        else { /* abandoned by the loop: nobody takes the results it did not take */
            for (Py_ssize_t r = shared->taken; r < shared->n_requests; r++) {
                struct inline_request *req = &shared->requests[r];
                for (Py_ssize_t j = 0; j < req->count; j++) {
                    free(shared->strings[req->first + j].data);
                    shared->strings[req->first + j].data = NULL;
                }
            }
            atomic_store(&shared->phase, INLINE_IDLE);
            spin = 0.0; /* a read that outlived the loop's wait: not worth a spin */
        }
        if (atomic_load(&shared->closing))
            break;
    }
    inline_release(shared);
    return NULL;
}

static PyObject *InlineReader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    double spin;
    int nice;
    static char *kwlist[] = {"spin", "nice", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "di:InlineReader", kwlist, &spin, &nice))
        return NULL;
    if (!(spin >= 0 && spin <= 1.0) || nice < -20 || nice > 19) {
        PyErr_SetString(PyExc_ValueError, "InlineReader: spin in 0..1 s, nice in -20..19");
        return NULL;
    }
    InlineReaderObject *self = (InlineReaderObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    struct inline_shared *shared = calloc(1, sizeof(*shared));
    if (shared == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    atomic_store(&shared->phase, INLINE_IDLE);
    atomic_store(&shared->thread_cpu, -1);
    atomic_store(&shared->refs, 1);
    shared->spin = spin;
    shared->nice = nice;
    self->shared = shared;
    return (PyObject *)self;
}

/* Let go of the shared state: the thread (if any) stops once it is out of its read. */
static void inline_close(InlineReaderObject *self)
{
    struct inline_shared *shared = self->shared;
    if (shared == NULL)
        return;
    self->shared = NULL;
    atomic_store(&shared->closing, 1);
    futex_wake_all(&shared->phase);
    futex_wake_all(&shared->posted); /* (asleep between two requests of a batch) */
    inline_release(shared);
}

static void InlineReader_dealloc(InlineReaderObject *self)
{
    inline_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Start the thread, every signal blocked in it (the interpreter's handlers run in the
 * main thread; a signal for the process must not land where nobody runs them). */
static int inline_start(InlineReaderObject *self)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return ENOMEM;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t thread;
    atomic_fetch_add(&self->shared->refs, 1);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&thread, &attr, inline_main, self->shared);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        atomic_fetch_sub(&self->shared->refs, 1);
        return rc;
    }
    self->started = 1;
    self->generation = inline_fork_generation;
    return 0;
}

PyDoc_STRVAR(InlineReader_read_doc,
"read(tid, addresses, limit, timeout, spin) -> list | int | None | False\n--\n\n"
"Read the NUL-terminated strings at `addresses` (a tuple) of thread `tid`, as\n"
"ReadBatch reads a job, in this reader's thread, waiting up to `timeout` seconds with\n"
"the GIL released (spinning up to `spin` of them while the thread spins on another\n"
"CPU). The result as ReadBatch.take() gives it; None if it was not read in time (the\n"
"thread finishes it alone); False if this reader cannot take it now (its thread is\n"
"still in an abandoned read, could not start, or the request is too large).");

/* A request's tid and limit, checked: 0, or -1 with an exception set. */
static int inline_request_args(PyObject *tid_obj, PyObject *limit_obj, long *tid,
                               size_t *limit)
{
    /* An int: a non-int's __index__ is Python code, which could change the requests
     * (read_many's list) or close this reader between their checks and their use. */
    if (!PyLong_Check(tid_obj)) {
        PyErr_SetString(PyExc_TypeError, "a request's tid is an int");
        return -1;
    }
    *tid = PyLong_AsLong(tid_obj);
    *limit = PyLong_AsSize_t(limit_obj);
    if (PyErr_Occurred())
        return -1;
    if (*tid <= 0 || *tid > INT_MAX || *limit == 0) {
        PyErr_Format(PyExc_ValueError, "InlineReader: tid %ld or limit %zu out of range",
                     *tid, *limit);
        return -1;
    }
    return 0;
}

/* A wait's timeout and spin, checked (NaN too): 0, or -1 with an exception set. */
static int inline_wait_args(PyObject *timeout_obj, PyObject *spin_obj, double *timeout,
                            double *spin)
{
    *timeout = PyFloat_AsDouble(timeout_obj);
    *spin = PyFloat_AsDouble(spin_obj);
    if (PyErr_Occurred())
        return -1;
    if (!(*timeout > 0 && *timeout <= 60.0 && *spin >= 0 && *spin <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "InlineReader: timeout in (0, 60] s, spin in 0..1 s");
        return -1;
    }
    return 0;
}

/* Whether `self` can take requests now: its thread idle (not in an abandoned read),
 * not a forked child's copy. */
static int inline_ready(InlineReaderObject *self)
{
    struct inline_shared *shared = self->shared;
    return shared != NULL && !(self->started && self->generation != inline_fork_generation) &&
           atomic_load(&shared->phase) == INLINE_IDLE;
}

/* Open a batch of requests on `self`'s thread (its `posted` word written: the requests
 * already written and closed, or none yet). 0, or -1 if the thread could not start. Then
 * inline_post for each request written, and inline_close_wait. */
static int inline_open(InlineReaderObject *self)
{
    struct inline_shared *shared = self->shared;
    if (!self->started && inline_start(self) != 0)
        return -1;
    atomic_store(&shared->done, 0);
    atomic_store(&shared->begun, 0);
    shared->taken = 0;
    /* Held until inline_finish: close() (from another thread, with the GIL while this
     * one waits without it) must not free what it is waiting on. */
    atomic_fetch_add(&shared->refs, 1);
    self->open_cpu = atomic_load(&shared->thread_cpu);
    atomic_store(&shared->loop_cpu, sched_getcpu());
    atomic_store(&shared->phase, INLINE_POSTED);
    if (atomic_load(&shared->thread_sleeping))
        futex_wake_all(&shared->phase);
    return 0;
}

/* `count` requests of the open batch written now (each before it is counted). */
static void inline_post(struct inline_shared *shared, Py_ssize_t count)
{
    atomic_store_explicit(&shared->posted, (uint32_t)count, memory_order_release);
    if (atomic_load(&shared->thread_waiting))
        futex_wake_all(&shared->posted);
}

/* Close the open batch (`count` requests, all posted) and wait up to `timeout` seconds,
 * the GIL released, for the thread to read them. Returns how many were read (the first
 * ones, in order): all of them, or fewer if the wait ran out (the rest are abandoned:
 * the thread finishes the one it is in alone and reads no more). The caller takes the
 * results of the requests read (strings_result) and then calls inline_finish. */
static Py_ssize_t inline_close_wait(InlineReaderObject *self, Py_ssize_t count,
                                    double timeout, double spin)
{
    struct inline_shared *shared = self->shared;
    shared->n_requests = count;
    self->reads += (unsigned long long)count;
    atomic_store_explicit(&shared->posted, (uint32_t)count | POSTED_CLOSED,
                          memory_order_release);
    if (atomic_load(&shared->thread_waiting))
        futex_wake_all(&shared->posted);
    /* (Where the thread was before it was woken: once woken, it reports the CPU it was
     * woken on, often the loop's, and the loop slept at once where it would have spun:
     * a guarded call at two fds took ~170 us p50 instead of ~85.) */
    int cpu = self->open_cpu, mine = sched_getcpu();
    atomic_store(&shared->loop_cpu, mine);
    Py_ssize_t done;
    Py_BEGIN_ALLOW_THREADS
    double start = monotonic_seconds(), until = start + timeout;
    /* Spin while the thread runs on another CPU, or sleeps (woken now, it goes where a
     * CPU is free: not this one, which the loop holds, unless none is). Only when it
     * last ran on this CPU, and is maybe queued behind the loop, does the loop sleep at
     * once to let it run. */
    if (spin > 0 && cpu != mine) {
        double spin_until = start + (timeout < spin ? timeout : spin);
        for (unsigned i = 1;; i++) {
            if (atomic_load_explicit(&shared->phase, memory_order_acquire) != INLINE_POSTED)
                break;
            CPU_RELAX();
            if ((i & 31) == 0 && monotonic_seconds() >= spin_until)
                break;
        }
    }
    for (;;) {
        atomic_store(&shared->loop_sleeping, 1);
        if (atomic_load(&shared->phase) != INLINE_POSTED)
            break;
        double left = until - monotonic_seconds();
        if (left <= 0)
            break;
        struct timespec ts;
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        syscall(SYS_futex, &shared->phase, FUTEX_WAIT_PRIVATE, INLINE_POSTED, &ts, NULL, 0);
    }
    atomic_store(&shared->loop_sleeping, 0);
    /* The requests read so far are the loop's, whatever happens next: the thread frees
     * only the strings of those from `taken` on. */
    shared->taken = done = atomic_load_explicit(&shared->done, memory_order_acquire);
    uint32_t expected = INLINE_POSTED;
    if (!atomic_compare_exchange_strong(&shared->phase, &expected, INLINE_ABANDONED))
        done = count; /* DONE: every request was read */
    Py_END_ALLOW_THREADS
    if (done < count)
        self->abandoned++;
    return done;
}

/* A batch of the n_requests requests written into self->shared (their strings' data
 * NULL), posted and waited for: inline_close_wait's result, or -1 if the thread could
 * not start. */
static Py_ssize_t inline_post_wait(InlineReaderObject *self, double timeout, double spin)
{
    struct inline_shared *shared = self->shared;
    Py_ssize_t count = shared->n_requests;
    atomic_store(&shared->posted, (uint32_t)count | POSTED_CLOSED);
    if (inline_open(self) < 0)
        return -1;
    return inline_close_wait(self, count, timeout, spin);
}

/* After inline_post_wait (and the results taken): the shared state goes back to the
 * thread (DONE -> IDLE; an abandoned one the thread sets IDLE itself, its read over). */
static void inline_finish(InlineReaderObject *self, struct inline_shared *shared)
{
    if (atomic_load(&shared->phase) == INLINE_DONE)
        atomic_store(&shared->phase, INLINE_IDLE);
    inline_release(shared);
}

/* Write request number `r` (its strings after the previous requests'): the addresses
 * of `addresses` (a tuple). 0, or -1 with an exception set. */
static int inline_put_request(struct inline_shared *shared, Py_ssize_t r, pid_t tid,
                              size_t limit, PyObject *addresses)
{
    struct inline_request *req = &shared->requests[r];
    req->tid = tid;
    req->limit = limit;
    req->first = r == 0 ? 0 : shared->requests[r - 1].first + shared->requests[r - 1].count;
    req->count = PyTuple_GET_SIZE(addresses);
    req->error = 0;
    req->seconds = 0.0;
    for (Py_ssize_t j = 0; j < req->count; j++) {
        struct batch_string *string = &shared->strings[req->first + j];
        string->address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(addresses, j));
        if (string->address == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        string->status = 0;
        string->length = 0;
        string->data = NULL;
    }
    return 0;
}

static PyObject *InlineReader_read(InlineReaderObject *self, PyObject *const *args,
                                   Py_ssize_t nargs)
{
    if (nargs != 5 || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "read(tid, addresses: tuple, limit, timeout, spin)");
        return NULL;
    }
    long tid;
    size_t limit;
    double timeout, spin;
    if (inline_request_args(args[0], args[2], &tid, &limit) < 0 ||
        inline_wait_args(args[3], args[4], &timeout, &spin) < 0)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(args[1]);
    if (!inline_ready(self) || limit > INLINE_MAX_LIMIT || count > INLINE_MAX_STRINGS)
        Py_RETURN_FALSE;
    struct inline_shared *shared = self->shared;
    shared->n_requests = 1;
    if (inline_put_request(shared, 0, (pid_t)tid, limit, args[1]) < 0)
        return NULL;
    Py_ssize_t done = inline_post_wait(self, timeout, spin);
    if (done < 0)
        Py_RETURN_FALSE;
    PyObject *result = Py_None;
    Py_INCREF(result);
    if (done == 1) {
        Py_SETREF(result, strings_result(shared->strings, shared->requests[0].count,
                                         shared->requests[0].error));
    }
    inline_finish(self, shared);
    return result;
}

PyDoc_STRVAR(InlineReader_read_many_doc,
"read_many(requests, timeout, spin) -> list | False\n--\n\n"
"read() for several requests at once (a list of (tid, addresses: tuple, limit)), read in\n"
"order by the thread within one wait: per request its result as read() gives it, None\n"
"for those not read when the wait ran out (the thread finishes the one it is in alone,\n"
"and reads no more). False if this reader cannot take them now, or they are too many.\n"
"What the compiled poll round does with its declared reads (poll_round).");

static PyObject *InlineReader_read_many(InlineReaderObject *self, PyObject *const *args,
                                        Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "read_many(requests: list, timeout, spin)");
        return NULL;
    }
    double timeout, spin;
    if (inline_wait_args(args[1], args[2], &timeout, &spin) < 0)
        return NULL;
    PyObject *requests = args[0];
    Py_ssize_t n = PyList_GET_SIZE(requests), strings = 0;
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *req = PyList_GET_ITEM(requests, r);
        if (!PyTuple_CheckExact(req) || PyTuple_GET_SIZE(req) != 3 ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(req, 1))) {
            PyErr_SetString(PyExc_TypeError, "a request is (tid, tuple of addresses, limit)");
            return NULL;
        }
        long tid;
        size_t limit;
        if (inline_request_args(PyTuple_GET_ITEM(req, 0), PyTuple_GET_ITEM(req, 2), &tid,
                                &limit) < 0)
            return NULL;
        Py_ssize_t count = PyTuple_GET_SIZE(PyTuple_GET_ITEM(req, 1));
        if (limit > INLINE_MAX_LIMIT || count > INLINE_MAX_STRINGS)
            Py_RETURN_FALSE;
        strings += count;
    }
    if (n == 0 || n > INLINE_MAX_REQUESTS || strings > INLINE_MAX_ALL_STRINGS ||
        !inline_ready(self))
        Py_RETURN_FALSE;
    struct inline_shared *shared = self->shared;
    shared->n_requests = n;
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *req = PyList_GET_ITEM(requests, r);
        if (inline_put_request(shared, r, (pid_t)PyLong_AsLong(PyTuple_GET_ITEM(req, 0)),
                               PyLong_AsSize_t(PyTuple_GET_ITEM(req, 2)),
                               PyTuple_GET_ITEM(req, 1)) < 0)
            return NULL;
    }
    Py_ssize_t done = inline_post_wait(self, timeout, spin);
    if (done < 0)
        Py_RETURN_FALSE;
    PyObject *results = PyList_New(n);
    for (Py_ssize_t r = 0; r < n; r++) {
        struct inline_request *req = &shared->requests[r];
        PyObject *result = Py_None;
        Py_INCREF(result);
        if (r < done) /* (taken even if the list failed: the strings are freed) */
            Py_SETREF(result, strings_result(&shared->strings[req->first], req->count,
                                             req->error));
        if (results == NULL || result == NULL) {
            Py_XDECREF(result);
            Py_CLEAR(results);
        }
        else
            PyList_SET_ITEM(results, r, result);
    }
    inline_finish(self, shared);
    return results;
}

/* ------------------------------------------------------------- a round's reads
 *
 * At many busy guarded containers the reads of declared paths went to the read pool one
 * by one, each decision handed to Python to wait and resumed by the pool's delivery: ~40
 * Python calls of bookkeeping per guarded call (the decision record, its deadline, the
 * job, the slot, the delivery), ~42,000 of the ~117,000 instructions of the loop's thread
 * at 100 busy containers (bench/README.md, "Session 17"). In a compiled poll round, an
 * async link's declared paths are collected here instead (round_collect, from
 * run_links) and posted at once to the InlineReader's thread, which reads them while
 * the loop decides the round's other notifications (round_stream, from a round's
 * second read on; a round of one read posts it at its end). At the end of the round (round_finish) the loop waits for what is left
 * (round_read), and each decision goes on in C (run_links, resumed), as a read waited
 * for inline does. The round never outlives the poll_round call: nothing of it is left
 * for a session that ends, and no fd closes under it. Whatever is not the common case
 * goes to Session._read_later, which reads through the pool and decides when the read
 * is delivered, never in the round: a read not done within the round's wait (the reader
 * is then abandoned, as at an inline wait, and the reads after it go to the next one),
 * a failed or refused read, a call no longer valid; and the decisions after one that
 * suspended get their paths that way (a round returns one Suspended at most). A session
 * whose reads were slow does not join rounds for a while (ROUND_SLOW_READ), so its
 * memory cannot make every round wait. Its twin, with the pure-Python loop, is the
 * per-decision path (Session._prefetch). */

/* A session whose reads in rounds took longer than ROUND_SLOW_READ ROUND_SLOW_STRIKES
 * times in a row, or whose read the thread was still in when a round's wait ended,
 * reads through the pool for ROUND_SLOW_FOR seconds: its slow memory delays its own
 * calls, not every round's. Reads take ~2-5 us; one preempted now and then (a busy
 * machine) is no reason, hence the strikes. */
#define ROUND_SLOW_READ 50e-6
/* Waits a round may add for the reads after ones its reader's thread stays in. */
#define ROUND_RETRIES 2
#define ROUND_SLOW_STRIKES 2
#define ROUND_SLOW_FOR 1.0

static void round_entry_clear(struct round_entry *e)
{
    Py_CLEAR(e->session);
    Py_CLEAR(e->n);
    Py_CLEAR(e->links);
    Py_CLEAR(e->allowed);
    Py_CLEAR(e->id);
    Py_CLEAR(e->tid);
    Py_CLEAR(e->nr);
    Py_CLEAR(e->arch);
    Py_CLEAR(e->args);
    Py_CLEAR(e->syscall);
    Py_CLEAR(e->wanted);
    Py_CLEAR(e->memory);
}

/* 1 if `obj` (a new reference, consumed) is false, as `not obj`; 0 if true; -1 on error. */
static int consume_false(PyObject *obj)
{
    if (obj == NULL)
        return -1;
    int truth = PyObject_IsTrue(obj);
    Py_DECREF(obj);
    return truth < 0 ? -1 : !truth;
}

/* A float attribute of `obj` (GET's cache is per call site: a macro). */
#define GET_DOUBLE(obj, name, out) ({                                           \
    PyObject *value_ = GET((obj), (name));                                      \
    int rc_ = -1;                                                               \
    if (value_ != NULL) {                                                       \
        *(out) = PyFloat_AsDouble(value_);                                      \
        Py_DECREF(value_);                                                      \
        rc_ = *(out) == -1.0 && PyErr_Occurred() ? -1 : 0;                      \
    }                                                                           \
    rc_; })

/* links[index] (an async link) of `n`: collect its declared paths for the round's read,
 * if this is their common case. ROUND_TAKEN (the decision waits for the round's end),
 * ROUND_NOTHING_TO_READ (its handler runs now, as a resumed one), ROUND_NOT_MINE (Python
 * takes it from this link: Session._decide_received, as without rounds), ROUND_RAISED
 * (its paths function raised: *raised_exc, handled as its handler's error), -1 (an
 * error of ours). Each condition is one that Session._prefetch and
 * TargetMemory.read_cstrings_soon check on the way. */
static int round_collect(struct poll_reads *round, PyObject *session, PyObject *n,
                         PyObject *link, PyObject *links, Py_ssize_t index,
                         PyObject *allowed, unsigned long long notif_id, PyObject *id,
                         PyObject *tid, PyObject *nr, PyObject *arch, PyObject *args,
                         PyObject *syscall, double received, PyObject **raised_exc)
{
    int rc = ROUND_NOT_MINE, truth, asked = 0;
    PyObject *paths = NULL, *memory = NULL, *value = NULL, *slot = NULL, *wanted = NULL,
             *arch_label = NULL;
    double wait, slow_until;
    if (round->n >= INLINE_MAX_REQUESTS ||
        round->strings + INLINE_MAX_STRINGS > INLINE_MAX_ALL_STRINGS ||
        !PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != 6)
        return ROUND_NOT_MINE;
    if ((paths = slot_get(link_paths, link)) == NULL)
        goto error;
    if (paths == Py_None)
        goto out; /* no declared paths: its first step, in Python */
    /* Every async slot taken: Python parks it before reading (Session._prefetch). */
    if ((truth = slots_full(session)) != 0)
        goto out_or_error;
    /* The session's memory: read with process_vm_readv through this pool, its place in
     * the pool free (no read of its own queued or running: its reads keep their
     * order), an inline wait allowed, its reads not slow lately. */
    if ((memory = GET(session, s_memory)) == NULL || (value = GET(memory, s_pool)) == NULL)
        goto error;
    if (value != Py_None && value != round->pool)
        goto out;
    if ((truth = consume_false(GET(memory, s_use_proc_mem))) != 1)
        goto out_or_error;
    if (GET_DOUBLE(memory, s_inline_wait, &wait) < 0 ||
        GET_DOUBLE(memory, s_round_slow_until, &slow_until) < 0)
        goto error;
    if (!(wait > 0 && wait <= 60.0) || now() < slow_until)
        goto out;
    if ((slot = GET(memory, s_slot)) == NULL)
        goto error;
    if ((truth = consume_false(GET(slot, s_deferred))) != 1 ||
        (truth = consume_false(GET(slot, s_borrowers))) != 1)
        goto out_or_error;
    long tid_value = PyLong_AsLong(tid);
    if (tid_value == -1 && PyErr_Occurred())
        goto error;
    if (tid_value <= 0 || tid_value > INT_MAX)
        goto out; /* not visible to us: Python refuses it */
    if ((arch_label = slot_get(notification_slots[N_ARCH], n)) == NULL)
        goto error;
    unsigned long long mask;
    if (str_equal(arch_label, s_x86_64) || str_equal(arch_label, s_x32))
        mask = ~0ULL;
    else if (str_equal(arch_label, s_x86))
        mask = 0xFFFFFFFFULL; /* an i386 call's registers: 32 bits (abi.POINTER_MASKS) */
    else
        goto out;
    /* The paths it declared, not read yet (policy code: what it raises is its
     * handler's error). Every exception goes to Python's _decide_received, as a
     * handler's does (call_handler): it answers on_error for a policy's, SystemExit
     * and any other BaseException included, and raises the daemon's own again. (Taken
     * here as an error of ours, a stray sys.exit() in a paths function left the poll
     * round, the poller task and the trio run: TrioInternalError, every container's
     * calls unanswered.) */
    PyObject *call[2] = {n, link};
    asked = 1;
    wanted = PyObject_Vectorcall(unread_paths_func, call, 2, NULL);
    if (wanted == NULL) {
        if ((*raised_exc = take_exception()) == NULL) {
            PyErr_SetString(PyExc_SystemError, "_unread_paths failed without an exception");
            goto error;
        }
        rc = ROUND_RAISED;
        goto out;
    }
    if (!PyTuple_CheckExact(wanted) || PyTuple_GET_SIZE(wanted) > INLINE_MAX_STRINGS) {
        PyErr_SetString(PyExc_SystemError, "_unread_paths returned no tuple of indexes");
        goto error;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(wanted);
    if (count == 0) {
        rc = ROUND_NOTHING_TO_READ;
        goto out;
    }
    struct round_entry *e = &round->entries[round->n];
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(wanted, j));
        if (i == -1 && PyErr_Occurred())
            goto error;
        if (i < 0 || i >= 6) {
            PyErr_SetString(PyExc_SystemError, "_unread_paths returned a bad index");
            goto error;
        }
        unsigned long long raw = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args, i));
        if (raw == (unsigned long long)-1 && PyErr_Occurred())
            goto error;
        e->addresses[j] = raw & mask;
    }
    /* TargetMemory.reads: the strings asked for. */
    PyObject *counted = PyLong_FromSsize_t(count);
    if (counted == NULL)
        goto error;
    int added = add_to_attr(memory, s_reads, counted);
    Py_DECREF(counted);
    if (added < 0)
        goto error;
    e->session = Py_NewRef(session);
    e->n = Py_NewRef(n);
    e->links = Py_NewRef(links);
    e->allowed = Py_NewRef(allowed);
    e->id = Py_NewRef(id);
    e->tid = Py_NewRef(tid);
    e->nr = Py_NewRef(nr);
    e->arch = Py_NewRef(arch);
    e->args = Py_NewRef(args);
    e->syscall = Py_NewRef(syscall);
    e->wanted = wanted;
    wanted = NULL;
    e->memory = memory;
    memory = NULL;
    e->index = index;
    e->count = count;
    e->notif_id = notif_id;
    e->tid_value = (pid_t)tid_value;
    e->received = received;
    e->wait = wait;
    e->fd = round->fd;
    round->n++;
    round->strings += count;
    round_stream(round);
    rc = ROUND_TAKEN;
    goto out;
out_or_error:
    if (truth < 0)
        goto error;
out:
    Py_XDECREF(paths);
    Py_XDECREF(memory);
    Py_XDECREF(value);
    Py_XDECREF(slot);
    Py_XDECREF(wanted);
    Py_XDECREF(arch_label);
    return rc;
error:
    /* A session whose memory is not a TargetMemory (a test's stand-in) has not every
     * attribute looked at before the paths function: not the round's. */
    if (!asked && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        goto out;
    }
    rc = -1;
    goto out;
}

/* How the read of `e` went for its session (see ROUND_SLOW_READ): `slow` (it took
 * long), `stuck` (the thread is still in it) or neither. 0, or -1 on error. */
static int round_judge(struct round_entry *e, int slow, int stuck)
{
    PyObject *strikes_obj = GET(e->memory, s_round_strikes);
    if (strikes_obj == NULL)
        return -1;
    long strikes = PyLong_AsLong(strikes_obj);
    Py_DECREF(strikes_obj);
    if (strikes == -1 && PyErr_Occurred())
        return -1;
    if (!slow && !stuck) {
        if (strikes == 0)
            return 0;
        strikes = 0;
    }
    else if (stuck || ++strikes >= ROUND_SLOW_STRIKES) {
        strikes = 0;
        PyObject *until = PyFloat_FromDouble(now() + ROUND_SLOW_FOR);
        if (until == NULL)
            return -1;
        int rc = PyObject_SetAttr(e->memory, s_round_slow_until, until);
        Py_DECREF(until);
        if (rc < 0)
            return -1;
    }
    PyObject *value = PyLong_FromLong(strikes);
    if (value == NULL)
        return -1;
    int rc = PyObject_SetAttr(e->memory, s_round_strikes, value);
    Py_DECREF(value);
    return rc;
}

/* Not the common case: Session._read_later reads its paths through the pool (and the
 * pool's delivery decides; never here). `values`: the paths, read and race-checked
 * already (a list), when only the round's one Suspended keeps it from going on here;
 * else NULL. */
static PyObject *round_read_later(struct round_entry *e, PyObject *values)
{
    PyObject *received = PyFloat_FromDouble(e->received), *index = NULL, *r = NULL;
    if (received != NULL && (index = PyLong_FromSsize_t(e->index)) != NULL) {
        PyObject *call[8] = {e->session, e->n, e->links, index, received, e->allowed,
                             e->wanted, values != NULL ? values : Py_None};
        r = PyObject_VectorcallMethod(s_read_later, call,
                                      8 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(index);
    Py_XDECREF(received);
    if (r != NULL && r != Py_None) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_SystemError, "Session._read_later decided in the round");
        return NULL;
    }
    return r;
}

/* One entry after the round's read: `result` (a new reference, or NULL: not read) as
 * strings_result gives it. Returns what run_links returns (None, a Suspended), or NULL
 * with an exception set. `may_suspend`: no decision of the round suspended yet. */
static PyObject *round_go_on(struct round_entry *e, PyObject *result, int may_suspend)
{
    int common = result != NULL && PyList_CheckExact(result);
    for (Py_ssize_t j = 0; common && j < PyList_GET_SIZE(result); j++)
        common = PyBytes_CheckExact(PyList_GET_ITEM(result, j));
    if (common) {
        /* ID_VALID after the read: the call still waits, these bytes are its arguments
         * (a call no longer valid goes to the pool, which finds it gone and counts it). */
        int rc;
        do {
            __u64 value = e->notif_id;
            rc = ioctl(e->fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &value);
        } while (rc < 0 && errno == EINTR);
        common = rc == 0;
    }
    if (!common || !may_suspend) {
        PyObject *r = round_read_later(e, common ? result : NULL);
        Py_XDECREF(result);
        return r;
    }
    PyObject *paths = slot_get(notification_slots[N_PATHS], e->n);
    if (paths == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    if (paths == Py_None) { /* (Notification._read_paths) */
        Py_DECREF(paths);
        if ((paths = PyDict_New()) == NULL ||
            slot_set(notification_slots[N_PATHS], e->n, paths) < 0) {
            Py_XDECREF(paths);
            Py_DECREF(result);
            return NULL;
        }
    }
    int rc = 0;
    for (Py_ssize_t j = 0; rc == 0 && j < e->count; j++)
        rc = PyDict_SetItem(paths, PyTuple_GET_ITEM(e->wanted, j), PyList_GET_ITEM(result, j));
    Py_DECREF(paths);
    Py_DECREF(result);
    if (rc < 0)
        return NULL;
    return run_links(e->session, e->n, e->links, e->index, 1, e->allowed, e->notif_id, e->id,
                     e->tid, e->nr, e->arch, e->args, e->syscall, e->received, 0);
}

/* The pool's InlineReader (a new reference) if it can take a batch now, else NULL. */
static PyObject *round_free_reader(struct poll_reads *round)
{
    PyObject *reader_obj = GET(round->pool, s_inline);
    if (reader_obj == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (Py_TYPE(reader_obj) != &InlineReaderType ||
        !inline_ready((InlineReaderObject *)reader_obj)) {
        Py_DECREF(reader_obj);
        return NULL;
    }
    return reader_obj;
}

/* Entry `e` as request `k` of `shared`, its strings from `first` on. */
static void round_put_request(struct inline_shared *shared, Py_ssize_t k,
                              struct round_entry *e, Py_ssize_t first)
{
    struct inline_request *req = &shared->requests[k];
    req->tid = e->tid_value;
    req->limit = 4096; /* PATH_MAX, what Session._prefetch reads */
    req->first = first;
    req->count = e->count;
    req->error = 0;
    req->seconds = 0.0;
    for (Py_ssize_t j = 0; j < e->count; j++) {
        struct batch_string *string = &shared->strings[first + j];
        string->address = e->addresses[j];
        string->status = 0;
        string->length = 0;
        string->data = NULL;
    }
}

/* The entry just collected (number round->n - 1) goes to the thread at once, which
 * reads it while the loop decides the round's other notifications: the round's second
 * opens a batch with the first two on the pool's InlineReader if it can take one, the
 * others follow. (Python code of the round that wants that reader meanwhile finds it
 * busy, and takes the pool's way.) A round of one has nothing for its read to overlap
 * with but the round's end: posted then, whole, as a batch (a thread that read it and
 * then waited for the batch to close cost a hand-over more: a guarded call beside an
 * idle container took ~170 us p50 instead of ~85). */
static void round_stream(struct poll_reads *round)
{
    Py_ssize_t r = round->n - 1;
    struct round_entry *e = &round->entries[r];
    Py_ssize_t first = round->strings - e->count;
    if (round->stream == NULL) {
        if (r != 1 || round->no_stream)
            return;
        round->no_stream = 1;
        PyObject *reader_obj = round_free_reader(round);
        if (reader_obj == NULL)
            return;
        InlineReaderObject *reader = (InlineReaderObject *)reader_obj;
        round_put_request(reader->shared, 0, &round->entries[0], 0);
        round_put_request(reader->shared, 1, e, first);
        atomic_store(&reader->shared->posted, 2);
        if (inline_open(reader) < 0) {
            Py_DECREF(reader_obj);
            return;
        }
        round->no_stream = 0;
        round->stream = reader_obj;
        round->stream_shared = reader->shared;
        return;
    }
    round_put_request(round->stream_shared, r, e, first);
    inline_post(round->stream_shared, r + 1);
}

/* The batch of round entries from `start` on, open on `reader_obj` (a strong reference,
 * released here) with each of them posted: closed and waited for until `until`, the
 * results taken into `results`, each read judged (round_judge), the reader given up if
 * its thread stays in one. Returns the index of the entry after the read the thread
 * stays in (slow memory: the entries from there can go to another reader), or n when
 * there is nothing more to try (all read, or the thread was late, not stuck). */
static Py_ssize_t round_wait_batch(struct poll_reads *round, PyObject **results,
                                   PyObject *reader_obj, Py_ssize_t start, double until,
                                   double spin)
{
    Py_ssize_t n = round->n, count = n - start;
    InlineReaderObject *reader = (InlineReaderObject *)reader_obj;
    struct inline_shared *shared = reader->shared;
    double left = until - monotonic_seconds();
    Py_ssize_t done = inline_close_wait(reader, count, left > 1e-6 ? left : 1e-6, spin);
    Py_ssize_t begun = atomic_load(&shared->begun);
    for (Py_ssize_t k = 0; k < count && k <= done; k++) {
        struct inline_request *req = &shared->requests[k];
        if (k < done) {
            results[start + k] = strings_result(&shared->strings[req->first], req->count,
                                                req->error);
            if (results[start + k] == NULL)
                PyErr_Clear(); /* (no memory for the strings: the pool reads them) */
        }
        /* Its own read was slow, or is the one the thread is still in (not one it did
         * not begin: the thread itself was late then, not this memory). */
        if (round_judge(&round->entries[start + k],
                        k < done && req->seconds > ROUND_SLOW_READ, k == done && k < begun) < 0)
            PyErr_Clear();
    }
    inline_finish(reader, shared);
    PyObject *counted = PyLong_FromSsize_t(done);
    if (counted == NULL || add_to_attr(round->pool, s_round_reads, counted) < 0)
        PyErr_WriteUnraisable(round->pool); /* (statistics) */
    Py_XDECREF(counted);
    if (done < count) {
        /* Its thread stays in a read: the pool gives the next reads to another reader
         * (ReadPool._inline_abandoned), as after an inline wait. */
        PyObject *args[2] = {round->pool, reader_obj};
        PyObject *r = PyObject_VectorcallMethod(s_round_abandoned, args,
                                                2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (r == NULL)
            PyErr_WriteUnraisable(round->pool); /* (its next reads go to the pool) */
        Py_XDECREF(r);
    }
    Py_DECREF(reader_obj);
    if (done == count || done >= begun)
        return n; /* all read; or the thread never began the next: late, not stuck */
    return start + done + 1; /* past the read the thread is in */
}

/* The reads of the round's entries, by the pool's InlineReader: per entry, results[r]
 * is its result (a new reference) or NULL (not read: no reader free, not read within
 * the waits, an error of ours, cleared). */
static void round_read(struct poll_reads *round, PyObject **results)
{
    Py_ssize_t n = round->n;
    double wait = 60.0, spin = 0.0, round_wait = 0.0;
    for (Py_ssize_t r = 0; r < n; r++) {
        results[r] = NULL;
        if (round->entries[r].wait < wait)
            wait = round->entries[r].wait;
    }
    /* The pool's round wait (ReadPool.round_wait), the shortest session's at most. */
    PyObject *got = NULL,
             *call[3] = {round->pool, PyLong_FromSsize_t(n), PyLong_FromLong(round->fds)};
    if (call[1] != NULL && call[2] != NULL &&
        GET_DOUBLE(round->pool, s_inline_spin, &spin) == 0)
        got = PyObject_VectorcallMethod(s_round_wait, call,
                                        3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(call[1]);
    Py_XDECREF(call[2]);
    if (got != NULL) {
        round_wait = PyFloat_AsDouble(got);
        Py_DECREF(got);
    }
    if (got == NULL || (round_wait == -1.0 && PyErr_Occurred()))
        PyErr_Clear();
    else if (round_wait < wait)
        wait = round_wait;
    if (!(spin >= 0 && spin <= 1.0) || !(wait > 0 && wait <= 60.0)) {
        spin = 0.0;
        wait = 1e-6; /* (a batch already open is closed; nothing else is read) */
    }
    double until = monotonic_seconds() + wait;
    Py_ssize_t start = 0;
    int waits = 0; /* the batch waits so far */
    if (round->stream != NULL) { /* posted as they were collected */
        waits = 1;
        PyObject *stream = round->stream;
        round->stream = NULL;
        if (((InlineReaderObject *)stream)->shared == round->stream_shared)
            start = round_wait_batch(round, results, stream, 0, until, spin);
        else { /* closed during the round (never by the daemon): its thread stops */
            inline_release(round->stream_shared);
            Py_DECREF(stream);
            start = n;
        }
    }
    /* The reads from `start` on, posted together. When the thread stays in one (slow
     * memory), those after it are posted again to the pool's next reader, with a wait
     * of their own (ROUND_RETRIES times at most: the loop blocks for one such wait per
     * read it gives up, and that read's container reads through the pool for a while):
     * a container's slow memory costs the others in its round no read through the pool,
     * behind its own slow ones. */
    for (; start < n; waits++) {
        if (waits > 0) {
            if (waits > ROUND_RETRIES)
                break;
            until = monotonic_seconds() + wait;
        }
        PyObject *reader_obj = round_free_reader(round);
        if (reader_obj == NULL)
            break;
        InlineReaderObject *reader = (InlineReaderObject *)reader_obj;
        struct inline_shared *shared = reader->shared;
        Py_ssize_t first = 0;
        for (Py_ssize_t k = 0; k < n - start; k++) {
            round_put_request(shared, k, &round->entries[start + k], first);
            first += round->entries[start + k].count;
        }
        atomic_store(&shared->posted, (uint32_t)(n - start) | POSTED_CLOSED);
        if (inline_open(reader) < 0) { /* its thread could not start: the pool reads them */
            Py_DECREF(reader_obj);
            break;
        }
        start = round_wait_batch(round, results, reader_obj, start, until, spin);
    }
}

/* The end of a round: its reads (round_read), then each decision goes on (see above).
 * *suspended (a new reference, or None) is the round's Suspended: one at most. Every
 * entry is dealt with and released, whatever fails: 0, or -1 with the first error that
 * is not a session's own (a session whose decision raised an Exception is unregistered
 * and gets on_failure, as in one_round) set once all are done. */
static int round_finish(struct poll_reads *round, PyObject *poller, PyObject **suspended)
{
    Py_ssize_t n = round->n;
    if (n == 0)
        return 0;
    PyObject *results[INLINE_MAX_REQUESTS] = {NULL};
    /* (Read even when the round has its Suspended already: the reads are under way, and
     * their decisions are delivered with them.) */
    round_read(round, results);
    PyObject *err_type = NULL, *err_value = NULL, *err_tb = NULL;
    for (Py_ssize_t r = 0; r < n; r++) {
        struct round_entry *e = &round->entries[r];
        /* After a daemon error, what is left reads through the pool. */
        PyObject *got = round_go_on(e, results[r], *suspended == Py_None && err_type == NULL);
        results[r] = NULL;
        if (got == NULL && reader_failed(poller, e->session, e->fd) < 0) {
            if (err_type == NULL)
                PyErr_Fetch(&err_type, &err_value, &err_tb);
            else
                PyErr_Clear();
        }
        else if (got != NULL && got != Py_None)
            Py_SETREF(*suspended, got);
        else
            Py_XDECREF(got);
        round_entry_clear(e);
    }
    round->n = 0;
    round->strings = 0;
    round->no_stream = 0;
    if (err_type != NULL) {
        PyErr_Restore(err_type, err_value, err_tb);
        return -1;
    }
    return 0;
}

static PyObject *InlineReader_close(InlineReaderObject *self, PyObject *unused)
{
    inline_close(self);
    Py_RETURN_NONE;
}

static PyObject *InlineReader_get_busy(InlineReaderObject *self, void *closure)
{
    return PyBool_FromLong(self->shared != NULL &&
                           atomic_load(&self->shared->phase) != INLINE_IDLE);
}

static PyObject *InlineReader_get_reads(InlineReaderObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->reads);
}

static PyObject *InlineReader_get_abandoned(InlineReaderObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->abandoned);
}

static PyGetSetDef InlineReader_getset[] = {
    {"busy", (getter)InlineReader_get_busy, NULL,
     "Whether its thread is in a read (an abandoned one, between reads).", NULL},
    {"reads", (getter)InlineReader_get_reads, NULL, "Reads given to its thread.", NULL},
    {"abandoned", (getter)InlineReader_get_abandoned, NULL,
     "Reads not done within their wait (finished by the thread alone).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef InlineReader_methods[] = {
    {"read", (PyCFunction)(void (*)(void))InlineReader_read, METH_FASTCALL,
     InlineReader_read_doc},
    {"read_many", (PyCFunction)(void (*)(void))InlineReader_read_many, METH_FASTCALL,
     InlineReader_read_many_doc},
    {"close", (PyCFunction)InlineReader_close, METH_NOARGS,
     "close()\n--\n\nStop the thread once it is out of its read; read() answers False."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject InlineReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._hotloop.InlineReader",
    .tp_basicsize = sizeof(InlineReaderObject),
    .tp_dealloc = (destructor)InlineReader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "InlineReader(spin, nice): a thread of its own for the reads the event loop\n"
              "waits for inline (see read()); it never takes the GIL.",
    .tp_new = InlineReader_new,
    .tp_methods = InlineReader_methods,
    .tp_getset = InlineReader_getset,
};

static PyMethodDef hotloop_methods[] = {
    {"poll_round", (PyCFunction)(void (*)(void))poll_round, METH_FASTCALL, poll_round_doc},
    {"recv_calls", recv_calls, METH_NOARGS, recv_calls_doc},
    {"recv_interrupted", recv_interrupted, METH_NOARGS, recv_interrupted_doc},
    {"watch_recv", (PyCFunction)(void (*)(void))watch_recv, METH_FASTCALL, watch_recv_doc},
    {"id_valid", (PyCFunction)(void (*)(void))id_valid, METH_FASTCALL, id_valid_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {"resume", (PyCFunction)(void (*)(void))resume, METH_FASTCALL, resume_doc},
    {"format_audit_line", (PyCFunction)(void (*)(void))format_audit_line, METH_FASTCALL,
     format_audit_line_doc},
    {"plain_path", plain_path, METH_O, plain_path_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hotloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor._hotloop",
    .m_doc = "The compiled hot loop (optional; see supervisor/accel.py).",
    .m_size = -1,
    .m_methods = hotloop_methods,
};

PyMODINIT_FUNC PyInit__hotloop(void)
{
    static const char *const names[] = {
        "notify", "_fd", "_buf", "journal", "_routes", "bucket", "_shadow", "stats",
        "recorder", "container", "memory", "_last_outcome", "notifications", "gone",
        "decisions", "latency", "_mm", "_mask", "on_ready", "on_failure", "unregister",
        "_read_elsewhere", "_decide_received", "decided", "allow", "recv", "send", "_last",
        "value", "bounds", "counts", "sum", "audit", "_audit", "none", "deny", "limiter",
        "limit", "epoch", "window", "written", "start", "suppressed", "_suppressed",
        "_generation", "_readers", "inflight", "_max_inflight", "_suspend", "_slot",
        "_use_proc_mem", "_pool", "_inline_wait", "deferred", "_borrowers", "reads",
        "_read_later", "inline", "round_wait", "inline_spin", "_round_slow_until", "x86",
        "x86_64", "x32", "round_reads", "_round_abandoned", "_round_strikes"};
    PyObject **targets[] = {
        &s_notify, &s_fd, &s_buf, &s_journal, &s_routes, &s_bucket, &s_shadow, &s_stats,
        &s_recorder, &s_container, &s_memory, &s_last_outcome, &s_notifications, &s_gone,
        &s_decisions, &s_latency, &s_mm, &s_mask, &s_on_ready, &s_on_failure, &s_unregister,
        &s_read_elsewhere, &s_decide_received, &s_decided, &s_allow, &s_recv, &s_send, &s_last,
        &s_value, &s_bounds, &s_counts, &s_sum, &s_audit, &s_audit_slow, &s_none, &s_deny,
        &s_limiter, &s_limit, &s_epoch, &s_window, &s_written, &s_start, &s_suppressed,
        &s_suppressed_counter, &s_generation, &s_readers, &s_inflight, &s_max_inflight,
        &s_suspend, &s_slot, &s_use_proc_mem, &s_pool, &s_inline_wait, &s_deferred,
        &s_borrowers, &s_reads, &s_read_later, &s_inline, &s_round_wait, &s_inline_spin,
        &s_round_slow_until, &s_x86, &s_x86_64, &s_x32, &s_round_reads, &s_round_abandoned,
        &s_round_strikes};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (*targets[i] == NULL && (*targets[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    static int atfork_registered;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, recv_watch_forked) != 0 ||
            pthread_atfork(NULL, NULL, inline_forked) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return NULL;
        }
        atfork_registered = 1;
    }
    if ((one == NULL && (one = PyLong_FromLong(1)) == NULL) ||
        (zero == NULL && (zero = PyLong_FromLong(0)) == NULL) ||
        (resumed_kwnames == NULL && (resumed_kwnames = PyTuple_Pack(1, PyUnicode_InternFromString(
             "resumed"))) == NULL) || format_audit_line_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hotloop_module);
    if (m == NULL)
        return NULL;
    /* Bumped whenever the Python side must change with the C side: accel.py refuses a
     * stale build (an editable install keeps an old .so until it is rebuilt). */
    if (PyType_Ready(&SignalType) < 0 ||
        PyModule_AddObjectRef(m, "Signal", (PyObject *)&SignalType) < 0 ||
        PyType_Ready(&ReadBatchType) < 0 ||
        PyModule_AddObjectRef(m, "ReadBatch", (PyObject *)&ReadBatchType) < 0 ||
        PyType_Ready(&InlineReaderType) < 0 ||
        PyModule_AddObjectRef(m, "InlineReader", (PyObject *)&InlineReaderType) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", HOTLOOP_API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
