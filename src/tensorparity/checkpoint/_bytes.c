/* Byte equality at memory speed, for spans_equal (checkpoint/_mapped.py) and same_bytes
 * (numerics/metrics.py): memcmp over two buffers with the GIL released, so that two threads
 * compare two pairs of tensors at once. Optional: where it is not built, the callers compare in
 * Python (bytearray ==, which holds the GIL). Also the page population of a mapped range
 * (MappedFile.view), which Python's mmap.madvise does holding the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14; older kernels answer EINVAL */
#endif
#endif

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

static PyObject *populate(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a;
    if (!PyArg_ParseTuple(args, "y*", &a))
        return NULL;
    int ok = 0;
#if defined(__linux__)
    if (a.len > 0) {
        const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        const uintptr_t start = (uintptr_t)a.buf & ~(page - 1);
        const size_t length = (size_t)((uintptr_t)a.buf + (uintptr_t)a.len - start);
        Py_BEGIN_ALLOW_THREADS
        ok = madvise((void *)start, length, MADV_POPULATE_READ) == 0;
        Py_END_ALLOW_THREADS
    }
#endif
    PyBuffer_Release(&a);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"same", same, METH_VARARGS,
     "same(a, b) -> whether two buffers hold the same bytes (memcmp, the GIL released)."},
    {"populate", populate, METH_VARARGS,
     "populate(view) -> whether the pages under a view of a file mapping were mapped in one call "
     "(Linux MADV_POPULATE_READ, the GIL released); False where the system cannot."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bytes", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bytes(void) { return PyModule_Create(&module); }
