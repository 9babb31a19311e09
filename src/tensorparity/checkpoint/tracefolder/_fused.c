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
 *
 * A statistics capture also signs every parameter (mapping/_param_signature.py: row and column
 * digests, two integer matrix products in torch): `signature` makes both in one read of the words.
 *
 * Tried and left out: measuring a large tensor's halves on a second thread. torch's OpenMP
 * workers spin between operations on the other core; a helper beside them made the statistics
 * capture of bench/bench_trace.py slower (1.33x the plain step against 1.21x).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* The signature's products, row by row: word j of row i adds w[j] x to the row's digest and
 * w[q + k i] x (q = j mod k) to its column's partial digest c[j] (summed over q by the caller). */
MULTIVERSION static void sign_rows(const uint32_t *x, size_t r, size_t n, size_t k, const uint32_t *a,
                                   const uint32_t *b, uint32_t *c0, uint32_t *c1, uint64_t *out) {
    for (size_t i = 0; i < r; i++) {
        const uint32_t *row = x + i * n;
        uint32_t s0 = 0, s1 = 0;
        if (k == 1) {
            const uint32_t p0 = a[i], p1 = b[i];
            for (size_t j = 0; j < n; j++) {
                const uint32_t v = row[j];
                s0 += a[j] * v;
                s1 += b[j] * v;
                c0[j] += p0 * v;
                c1[j] += p1 * v;
            }
        } else {
            for (size_t j = 0; j < n; j++) {
                const uint32_t v = row[j];
                const size_t at = j % k + k * i;
                s0 += a[j] * v;
                s1 += b[j] * v;
                c0[j] += a[at] * v;
                c1[j] += b[at] * v;
            }
        }
        out[i] = (uint64_t)s0 | ((uint64_t)s1 << 32);
    }
}

/* Where the copy goes: spans laid end to end (a trace writer's blocks: a tensor may straddle
 * two or more), as long as the data together. A cursor follows the rows, which come in order. */
typedef struct {
    Py_buffer *spans;
    size_t n, at, start; /* spans; the cursor: span index and the data offset it starts at */
} dest_t;

/* The destination of data bytes [off, off + len) where they fall in one span, else NULL. */
static unsigned char *dest_at(dest_t *d, size_t off, size_t len) {
    if (d == NULL)
        return NULL;
    while (d->at < d->n && off >= d->start + (size_t)d->spans[d->at].len) {
        d->start += (size_t)d->spans[d->at].len;
        d->at++;
    }
    if (d->at == d->n || off + len > d->start + (size_t)d->spans[d->at].len)
        return NULL;
    return (unsigned char *)d->spans[d->at].buf + (off - d->start);
}

/* Copy data bytes [off, off + len) from src to their spans, piece by piece. */
static void dest_copy(dest_t *d, size_t off, const unsigned char *src, size_t len) {
    while (len) {
        dest_at(d, off, 1);
        const size_t room = d->start + (size_t)d->spans[d->at].len - off, take = len < room ? len : room;
        memcpy((unsigned char *)d->spans[d->at].buf + (off - d->start), src, take);
        off += take;
        src += take;
        len -= take;
    }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(TP_SCALAR)
#include <immintrin.h>
#define TP_AVX2 1

/* The parts of a row step shared by both element types: two 32-byte loads added to the column
 * sums and the row's sum; and their copy, streamed or stored. */
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
AVX2_INLINE void load_words(const unsigned char *row, size_t c, uint64_t *cols, __m256i *w0, __m256i *w1,
                            __m256i *a, __m256i *b) {
    *a = _mm256_loadu_si256((const __m256i *)(row + c * 8));
    *b = _mm256_loadu_si256((const __m256i *)(row + c * 8 + 32));
    __m256i *col = (__m256i *)(cols + c);
    _mm256_storeu_si256(col, _mm256_add_epi64(_mm256_loadu_si256(col), *a));
    _mm256_storeu_si256(col + 1, _mm256_add_epi64(_mm256_loadu_si256(col + 1), *b));
    *w0 = _mm256_add_epi64(*w0, *a);
    *w1 = _mm256_add_epi64(*w1, *b);
}

AVX2_INLINE void store_words(unsigned char *to, size_t c, int stream, __m256i a, __m256i b) {
    if (stream) {
        _mm256_stream_si256((__m256i *)(to + c * 8), a);
        _mm256_stream_si256((__m256i *)(to + c * 8 + 32), b);
    } else if (to != NULL) {
        _mm256_storeu_si256((__m256i *)(to + c * 8), a);
        _mm256_storeu_si256((__m256i *)(to + c * 8 + 32), b);
    }
}

/* Sixteen float32 lanes (two registers) as four float64 lanes: their sums, widened. */
AVX2_INLINE __m256d widen(__m256 x, __m256 y) {
    const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    const __m256d y0 = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), y1 = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
    return _mm256_add_pd(_mm256_add_pd(x0, x1), _mm256_add_pd(y0, y1));
}

/* Whole rows in one pass, AVX2 + FMA: each 32-byte load feeds the column sums, the row's sum, the
 * float sums and the minimum and maximum, and is stored to the copy (non-temporal where it is 32-byte
 * aligned: a trace block goes to the disk, not back to this core; a row that straddles two spans is
 * copied from the L1 cache after it) -- where the portable route reads
 * a row twice and spends ~100 cycles a row reducing its lanes. Lanes: float32 within a row (as the
 * portable route), float64 across rows; minimum and maximum skip NaN like the portable route's
 * (vminps returns its second operand where either is NaN). Returns the rows' part of plain and
 * weighted through the pointers, and adds to acc. */
__attribute__((target("avx2,fma"))) static void rows_avx2(const unsigned char *p, size_t nrows, int is_double,
                                                          dest_t *dest, uint64_t *cols, uint64_t *plain,
                                                          uint64_t *weighted, double *acc) {
    int streamed = 0;
    __m256d ds = _mm256_setzero_pd(), dq = _mm256_setzero_pd();
    __m256 lo0 = _mm256_set1_ps(INFINITY), lo1 = lo0, hi0 = _mm256_set1_ps(-INFINITY), hi1 = hi0;
    __m256d dlo0 = _mm256_set1_pd(INFINITY), dlo1 = dlo0, dhi0 = _mm256_set1_pd(-INFINITY), dhi1 = dhi0;
    uint64_t sum_plain = 0, sum_weighted = 0;
    for (size_t r = 0; r < nrows; r++) {
        const unsigned char *row = p + r * BLOCK * 8;
        unsigned char *to = dest_at(dest, r * BLOCK * 8, BLOCK * 8);
        const int stream = to != NULL && ((uintptr_t)to % 32) == 0;
        streamed |= stream;
        __m256i w0 = _mm256_setzero_si256(), w1 = w0;
        if (!is_double) {
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, q0 = s0, q1 = s0;
            for (size_t c = 0; c < BLOCK; c += 8) {
                __m256i a, b;
                load_words(row, c, cols, &w0, &w1, &a, &b);
                const __m256 fa = _mm256_castsi256_ps(a), fb = _mm256_castsi256_ps(b);
                s0 = _mm256_add_ps(s0, fa);
                s1 = _mm256_add_ps(s1, fb);
                q0 = _mm256_fmadd_ps(fa, fa, q0);
                q1 = _mm256_fmadd_ps(fb, fb, q1);
                lo0 = _mm256_min_ps(fa, lo0);
                lo1 = _mm256_min_ps(fb, lo1);
                hi0 = _mm256_max_ps(fa, hi0);
                hi1 = _mm256_max_ps(fb, hi1);
                store_words(to, c, stream, a, b);
            }
            ds = _mm256_add_pd(ds, widen(s0, s1));
            dq = _mm256_add_pd(dq, widen(q0, q1));
        } else {
            for (size_t c = 0; c < BLOCK; c += 8) {
                __m256i a, b;
                load_words(row, c, cols, &w0, &w1, &a, &b);
                const __m256d fa = _mm256_castsi256_pd(a), fb = _mm256_castsi256_pd(b);
                ds = _mm256_add_pd(ds, _mm256_add_pd(fa, fb));
                dq = _mm256_fmadd_pd(fa, fa, _mm256_fmadd_pd(fb, fb, dq));
                dlo0 = _mm256_min_pd(fa, dlo0);
                dlo1 = _mm256_min_pd(fb, dlo1);
                dhi0 = _mm256_max_pd(fa, dhi0);
                dhi1 = _mm256_max_pd(fb, dhi1);
                store_words(to, c, stream, a, b);
            }
        }
        if (dest != NULL && to == NULL)
            dest_copy(dest, r * BLOCK * 8, row, BLOCK * 8);
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(w0, w1));
        const uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
        sum_plain += sum;
        sum_weighted += sum * weyl(r);
    }
    if (streamed)
        _mm_sfence(); /* the streamed stores are visible to the thread that writes the block */
    double d[4], e[4];
    _mm256_storeu_pd(d, ds);
    _mm256_storeu_pd(e, dq);
    acc[0] += (d[0] + d[1]) + (d[2] + d[3]);
    acc[1] += (e[0] + e[1]) + (e[2] + e[3]);
    if (!is_double) {
        dlo0 = _mm256_min_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(_mm256_min_ps(lo0, lo1))),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(_mm256_min_ps(lo0, lo1), 1)));
        dhi0 = _mm256_max_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(_mm256_max_ps(hi0, hi1))),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(_mm256_max_ps(hi0, hi1), 1)));
    } else {
        dlo0 = _mm256_min_pd(dlo0, dlo1);
        dhi0 = _mm256_max_pd(dhi0, dhi1);
    }
    _mm256_storeu_pd(d, dlo0);
    _mm256_storeu_pd(e, dhi0);
    for (int k = 0; k < 4; k++) {
        acc[2] = d[k] < acc[2] ? d[k] : acc[2];
        acc[3] = e[k] > acc[3] ? e[k] : acc[3];
    }
    *plain += sum_plain;
    *weighted += sum_weighted;
}
#endif

static PyObject *measure(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    PyObject *into = Py_None;
    int is_double, portable = 0;
    if (!PyArg_ParseTuple(args, "y*p|Op", &data, &is_double, &into, &portable))
        return NULL;
    /* into: None, a writable buffer, or a list (tuple) of them laid end to end */
    PyObject *list = into == Py_None                                 ? NULL
                     : PyList_Check(into) || PyTuple_Check(into) ? PySequence_Fast(into, "")
                                                                   : PyTuple_Pack(1, into);
    const Py_ssize_t nspans = list == NULL ? 0 : PySequence_Fast_GET_SIZE(list);
    Py_buffer *spans = nspans ? PyMem_Calloc((size_t)nspans, sizeof(Py_buffer)) : NULL;
    Py_ssize_t got = 0;
    size_t total = 0;
    PyObject *result = NULL;
    int failed = (into != Py_None && list == NULL) || (nspans && spans == NULL);
    if (nspans && spans == NULL)
        PyErr_NoMemory();
    for (; !failed && got < nspans; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(list, got);
        if (PyObject_GetBuffer(item, &spans[got], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            failed = 1;
            break;
        }
        total += (size_t)spans[got].len;
    }
    dest_t where = {spans, (size_t)nspans, 0, 0};
    dest_t *dest = list == NULL ? NULL : &where;
    const size_t nbytes = (size_t)data.len, nwords = nbytes / 8, nrows = nwords / BLOCK;
    if (failed) {
        /* the error is set: no memory, or an item that is no writable contiguous buffer */
    } else if (dest != NULL && total != nbytes) {
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
        size_t r = 0;
#ifdef TP_AVX2
        if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            rows_avx2(p, nrows, is_double, dest, cols, &plain, &weighted, acc);
            r = nrows;
        }
#endif
        for (; r < nrows; r++) {
            const unsigned char *row = p + r * BLOCK * 8;
            const uint64_t sum = row_words((const uint64_t *)row, cols);
            plain += sum;
            weighted += sum * weyl(r);
            if (is_double)
                stats_f64((const double *)row, BLOCK, acc);
            else
                stats_f32((const float *)row, 2 * BLOCK, acc);
            if (dest != NULL)
                dest_copy(dest, r * BLOCK * 8, row, BLOCK * 8);
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
            if (dest != NULL)
                dest_copy(dest, done, p + done, nbytes - done);
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(ddddKK)", acc[2], acc[3], acc[0], acc[1], (unsigned long long)plain,
                               (unsigned long long)weighted);
    }
    PyBuffer_Release(&data);
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&spans[i]);
    PyMem_Free(spans);
    Py_XDECREF(list);
    return result;
}

/* A parameter's content signature (mapping/_param_signature.py): the matrix x [r, width] of int32
 * words, k words per element; w0, w1: the two lanes of position weights (at least
 * max(width, k * r) each). rows[i] = sum_j w[j] x[i, j]; cols[c] = sum_i sum_q w[q + k i] x[i, c k + q];
 * every sum modulo 2**32, a lane in each half of the int64 results. The same integers as the
 * integer matrix products it stands for, in one read of x. */
static PyObject *signature(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, w0, w1, rows, cols;
    Py_ssize_t r, width, k;
    if (!PyArg_ParseTuple(args, "y*nnny*y*w*w*", &x, &r, &width, &k, &w0, &w1, &rows, &cols))
        return NULL;
    PyObject *result = NULL;
    const size_t need = (size_t)(width > k * r ? width : k * r) * 4;
    if (r < 1 || width < 1 || k < 1 || width % k || (size_t)x.len != (size_t)r * (size_t)width * 4 ||
        (size_t)w0.len < need || (size_t)w1.len < need || (size_t)rows.len != (size_t)r * 8 ||
        (size_t)cols.len != (size_t)(width / k) * 8 || ((uintptr_t)x.buf | (uintptr_t)w0.buf | (uintptr_t)w1.buf |
                                                         (uintptr_t)rows.buf | (uintptr_t)cols.buf) % 4) {
        PyErr_SetString(PyExc_ValueError, "signature: buffers of the wrong size or alignment");
    } else {
        const uint32_t *xs = x.buf, *a = w0.buf, *b = w1.buf;
        uint64_t *out_rows = rows.buf, *out_cols = cols.buf;
        const size_t n = (size_t)width, m = (size_t)(width / k), kk = (size_t)k;
        uint32_t *c0 = calloc(2 * n, sizeof(uint32_t));
        if (c0 == NULL) {
            PyErr_NoMemory();
        } else {
            uint32_t *c1 = c0 + n;
            Py_BEGIN_ALLOW_THREADS
            sign_rows(xs, (size_t)r, n, kk, a, b, c0, c1, out_rows);
            for (size_t c = 0; c < m; c++) {
                uint32_t s0 = 0, s1 = 0;
                for (size_t q = 0; q < kk; q++) {
                    s0 += c0[c * kk + q];
                    s1 += c1[c * kk + q];
                }
                out_cols[c] = (uint64_t)s0 | ((uint64_t)s1 << 32);
            }
            Py_END_ALLOW_THREADS
            free(c0);
            Py_INCREF(Py_None);
            result = Py_None;
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w0);
    PyBuffer_Release(&w1);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&cols);
    return result;
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS,
     "measure(data, is_double[, dst[, portable]]) -> (min, max, sum, sum of squares, plain, weighted): the "
     "statistics of float32/float64 data and the two halves of its fp2 fingerprint (wrapping "
     "sums of its int64 words, and of their row and column sums laid out 1024 to a row, weighted "
     "by position); copies data into dst on the way, where given: a writable buffer as long as "
     "data, or a list of them that are as long together (None: no copy). portable: the portable "
     "loop even where the AVX2 one could run (tests)."},
    {"signature", signature, METH_VARARGS,
     "signature(x, r, width, k, w0, w1, rows, cols) -> None: a parameter's row and column digests "
     "(x: r x width int32 words, k per element; w0, w1: uint32 position weights) written into rows "
     "(int64 [r]) and cols (int64 [width / k])."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
