/* One read of a float32/float64 tensor for everything a statistics capture measures.
 *
 * stats.py computes, for every captured tensor, the fp2 fingerprint (wrapping int64 row and
 * column sums of the tensor's words laid out 1024 to a row, combined with position weights) and
 * min, max, sum and sum of squares; a trace writer also has the bytes copied into its block.
 * In torch that is five passes over the data; here each 8 KB row is read once from memory and then
 * summed from the L1 cache. The results are the same: the integer sums bit for bit, the float
 * sums to rounding (float32 lanes per row, float64 across rows; NaN and Inf leave the sums
 * non-finite and stats.py then takes its exact path). Python never passes a pointer here: the
 * lengths come from the buffers themselves and are checked before any read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024 /* words per row, as in stats.py */
#define LANES 16

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* acc: sum, sum of squares, min, max */
#define FLOAT_STATS(NAME, T)                                                                       \
    MULTIVERSION static void NAME(const T *x, size_t n, double *acc) {                            \
        T s[LANES] = {0}, q[LANES] = {0}, lo[LANES], hi[LANES];                                    \
        for (int k = 0; k < LANES; k++) {                                                          \
            lo[k] = (T)INFINITY;                                                                   \
            hi[k] = -(T)INFINITY;                                                                  \
        }                                                                                          \
        size_t i = 0;                                                                              \
        for (; i + LANES <= n; i += LANES)                                                         \
            for (int k = 0; k < LANES; k++) {                                                      \
                T v = x[i + k];                                                                    \
                s[k] += v;                                                                         \
                q[k] += v * v;                                                                     \
                lo[k] = v < lo[k] ? v : lo[k];                                                     \
                hi[k] = v > hi[k] ? v : hi[k];                                                     \
            }                                                                                      \
        double ds = 0, dq = 0, dlo = acc[2], dhi = acc[3];                                         \
        for (; i < n; i++) {                                                                       \
            double v = x[i];                                                                       \
            ds += v;                                                                               \
            dq += v * v;                                                                           \
            dlo = v < dlo ? v : dlo;                                                               \
            dhi = v > dhi ? v : dhi;                                                               \
        }                                                                                          \
        for (int k = 0; k < LANES; k++) {                                                          \
            ds += s[k];                                                                            \
            dq += q[k];                                                                            \
            dlo = lo[k] < dlo ? lo[k] : dlo;                                                       \
            dhi = hi[k] > dhi ? hi[k] : dhi;                                                       \
        }                                                                                          \
        acc[0] += ds;                                                                              \
        acc[1] += dq;                                                                              \
        acc[2] = dlo;                                                                              \
        acc[3] = dhi;                                                                              \
    }

FLOAT_STATS(stats_f32, float)
FLOAT_STATS(stats_f64, double)

MULTIVERSION static uint64_t row_words(const uint64_t *w, uint64_t *cols) {
    uint64_t sum = 0; /* unsigned: wrapping addition is defined, and equals int64's bit for bit */
    for (int c = 0; c < BLOCK; c++) {
        uint64_t v = w[c];
        sum += v;
        cols[c] += v;
    }
    return sum;
}

/* The fingerprint's position weights: odd multipliers of a Weyl sequence (stats.py _positions). */
static inline uint64_t weyl(uint64_t i) { return ((i * 0x9E3779B97F4A7C15ULL) & ((1ULL << 62) - 1)) * 2 + 1; }

static PyObject *measure(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, dst = {0};
    int is_double;
    if (!PyArg_ParseTuple(args, "y*p|w*", &data, &is_double, &dst))
        return NULL;
    const size_t nbytes = (size_t)data.len, nwords = nbytes / 8, nrows = nwords / BLOCK;
    unsigned char *copy = dst.buf; /* where given: each row is also copied there, from the L1 cache */
    PyObject *result = NULL;
    if (copy != NULL && (size_t)dst.len != nbytes) {
        PyErr_SetString(PyExc_ValueError, "measure: dst must be as long as data");
    } else if (nbytes % 8 || ((uintptr_t)data.buf) % 8) {
        PyErr_SetString(PyExc_ValueError, "measure: the data must be 8-byte aligned, a whole number of words");
    } else {
        double acc[4] = {0.0, 0.0, INFINITY, -INFINITY};
        const unsigned char *p = data.buf;
        uint64_t plain = 0, weighted = 0;
        Py_BEGIN_ALLOW_THREADS
        uint64_t cols[BLOCK];
        memset(cols, 0, sizeof cols);
        for (size_t r = 0; r < nrows; r++) {
            const unsigned char *row = p + r * BLOCK * 8;
            const uint64_t sum = row_words((const uint64_t *)row, cols);
            plain += sum;
            weighted += sum * weyl(r);
            if (is_double)
                stats_f64((const double *)row, BLOCK, acc);
            else
                stats_f32((const float *)row, 2 * BLOCK, acc);
            if (copy != NULL)
                memcpy(copy + r * BLOCK * 8, row, BLOCK * 8);
        }
        if (nrows)
            for (size_t c = 0; c < BLOCK; c++)
                weighted += 31 * cols[c] * weyl(c);
        const size_t done = nrows * BLOCK * 8;
        if (done < nbytes) {
            const uint64_t *tail = (const uint64_t *)(p + done);
            for (size_t j = 0; j < nwords - nrows * BLOCK; j++) {
                plain += tail[j];
                weighted += 17 * tail[j] * weyl(j);
            }
            if (is_double)
                stats_f64((const double *)(p + done), (nbytes - done) / 8, acc);
            else
                stats_f32((const float *)(p + done), (nbytes - done) / 4, acc);
            if (copy != NULL)
                memcpy(copy + done, p + done, nbytes - done);
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(ddddKK)", acc[2], acc[3], acc[0], acc[1], (unsigned long long)plain,
                               (unsigned long long)weighted);
    }
    PyBuffer_Release(&data);
    if (dst.obj != NULL)
        PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS,
     "measure(data, is_double[, dst]) -> (min, max, sum, sum of squares, plain, weighted): the "
     "statistics of float32/float64 data and the two halves of its fp2 fingerprint (wrapping "
     "sums of its int64 words, and of their row and column sums laid out 1024 to a row, weighted "
     "by position); copies data into dst (as long as data) on the way, where given."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
