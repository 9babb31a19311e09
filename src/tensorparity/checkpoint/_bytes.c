/* Byte equality at memory speed, for spans_equal (checkpoint/_mapped.py) and same_bytes
 * (numerics/metrics.py): memcmp over two buffers with the GIL released, so that two threads
 * compare two pairs of tensors at once. Optional: where it is not built, the callers compare in
 * Python (bytearray ==, which holds the GIL). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *same(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b))
        return NULL;
    int equal = 0;
    if (a.len == b.len) {
        Py_BEGIN_ALLOW_THREADS
        equal = a.len == 0 || memcmp(a.buf, b.buf, (size_t)a.len) == 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(equal);
}

static PyMethodDef methods[] = {
    {"same", same, METH_VARARGS,
     "same(a, b) -> whether two buffers hold the same bytes (memcmp, the GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bytes", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bytes(void) { return PyModule_Create(&module); }
