/* The compiled hot loop of seccomp-supervisor (see setup.py and supervisor/accel.py).
 *
 * Everything here has a pure-Python twin that stays the reference: the tests run both. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef hotloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor._hotloop",
    .m_doc = "The compiled hot loop (optional; see supervisor/accel.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__hotloop(void)
{
    PyObject *m = PyModule_Create(&hotloop_module);
    if (m == NULL)
        return NULL;
    /* Bumped whenever the Python side must change with the C side: accel.py refuses a
     * stale build (an editable install keeps an old .so until it is rebuilt). */
    if (PyModule_AddIntConstant(m, "API_VERSION", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
