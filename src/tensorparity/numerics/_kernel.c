/* One read of two float32 (or two float64) tensors for everything compare_tensors measures.
 *
 * metrics.py's torch route widens both chunks to float64 and makes some twenty passes over them
 * (difference, magnitudes, the tolerance test, two ratios, three dot products, a finiteness
 * check); on a trace of a port, where nearly every value differs in its last bits, that is most
 * of a compare. Here each element is read once, widened in a register and every statistic is
 * updated from it, with the same float64 arithmetic per element (compiled without contraction
 * into fused multiply-adds, which would round differently), so the mismatch count, the first
 * mismatch and the maxima are the torch route's exactly, the two largest ratios to an ulp and the
 * sums to rounding (4 or 8 float64 lanes per 1024-element block instead of torch's pairwise order). Where either side holds a NaN or an Inf the kernel
 * says so and metrics.py takes its exact route, which counts them. The GIL is released: the
 * comparisons of a trace run side by side on every core. Python never passes a pointer here:
 * the lengths come from the buffers themselves and are checked before any read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024 /* elements per block: the first mismatch is searched for within one block */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    double max_abs, sum_abs, sum_absb, max_absb, max_rel, req_atol, req_rtol, dot, norm_a, norm_b;
    int64_t n_bad;
} acc_t;

static double max2(double x, double y) { return x > y ? x : y; }

/* The largest of the ratios num/den seen so far is kept as the pair (num, den), den >= 0, and
 * candidates are compared by cross-multiplication, so no element costs a division: den == 0
 * stands for +Inf where num > 0 (metrics.py's rule for a zero |b|) and never wins where num <= 0.
 * The winner is divided once at the end; where the products round (values of very different
 * magnitudes) it may be a neighbour of the largest quotient within an ulp. */
static double quotient(double num, double den) { return den > 0 ? num / den : (num > 0 ? INFINITY : 0.0); }

/* Per-lane running statistics of one block. */
typedef struct {
    double mabs, sabs, sb, mb, reqa, dot, na, nb, reln, reld, needn, needd, bad;
} lane_t;

static inline void lane_init(lane_t *l) {
    l->mabs = l->sabs = l->sb = l->mb = l->dot = l->na = l->nb = l->reln = l->needn = l->bad = 0.0;
    l->reld = l->needd = 1.0;
    l->reqa = -INFINITY;
}

/* One element into one lane: the scalar form of the vector loop below, for the tail of a block. */
static void lane_step(lane_t *l, double x, double y, double atol, double rtol) {
    double ad = fabs(x - y), ab = fabs(y), rab = rtol * ab, ra = ad - rab, need = ad - atol;
    l->bad += ad > atol + rab ? 1.0 : 0.0;
    l->mabs = max2(l->mabs, ad);
    l->mb = max2(l->mb, ab);
    l->reqa = max2(l->reqa, ra);
    if (ad * l->reld > l->reln * ab) {
        l->reln = ad;
        l->reld = ab;
    }
    if (need * l->needd > l->needn * ab) {
        l->needn = need;
        l->needd = ab;
    }
    l->sabs += ad;
    l->sb += ab;
    l->dot += x * y;
    l->na += x * x;
    l->nb += y * y;
}

static void lane_merge(acc_t *acc, const lane_t *l) {
    acc->max_abs = max2(acc->max_abs, l->mabs);
    acc->max_absb = max2(acc->max_absb, l->mb);
    acc->max_rel = max2(acc->max_rel, quotient(l->reln, l->reld));
    acc->req_atol = max2(acc->req_atol, l->reqa);
    acc->req_rtol = max2(acc->req_rtol, quotient(l->needn, l->needd));
    acc->sum_abs += l->sabs;
    acc->sum_absb += l->sb;
    acc->dot += l->dot;
    acc->norm_a += l->na;
    acc->norm_b += l->nb;
    acc->n_bad += (int64_t)l->bad;
}

#if defined(__GNUC__) && !defined(TP_SCALAR) /* GCC and Clang: vector extensions, the float64 lanes of one register */
typedef double vd4 __attribute__((vector_size(32)));
typedef long long vl4 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd8 __attribute__((vector_size(64)));
typedef long long vl8 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

#define PICK(MASK, YES, NO) ((__typeof__(YES))(((__typeof__(MASK))(YES) & (MASK)) | ((__typeof__(MASK))(NO) & ~(MASK))))
#define LOAD_F32(VD, VF, DST, P)                                                                   \
    do {                                                                                           \
        VF f_;                                                                                     \
        memcpy(&f_, (P), sizeof f_);                                                               \
        DST = __builtin_convertvector(f_, VD);                                                     \
    } while (0)
#define LOAD_F64(VD, VF, DST, P) memcpy(&(DST), (P), sizeof(DST))

/* Elements [0, n) with n a multiple of W, into W lanes. */
#define VECTOR_LOOP(NAME, T, W, VD, VL, VF, LOAD, ATTR)                                            \
    ATTR static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, lane_t *lanes) { \
        const VD zero = {0}, one = zero + 1.0, vatol = zero + atol, vrtol = zero + rtol;           \
        const VL absmask = (VL){0} + INT64_MAX;                                                    \
        VD mabs = zero, sabs = zero, sb = zero, mb = zero, dot = zero, na = zero, nb = zero;       \
        VD reln = zero, reld = one, needn = zero, needd = one, bad = zero, reqa = zero - INFINITY; \
        for (size_t i = 0; i < n; i += W) {                                                        \
            VD x, y;                                                                               \
            LOAD(VD, VF, x, a + i);                                                                \
            LOAD(VD, VF, y, b + i);                                                                \
            VD ad = (VD)((VL)(x - y) & absmask), ab = (VD)((VL)y & absmask);                       \
            VD rab = vrtol * ab, ra = ad - rab, need = ad - vatol;                                 \
            bad += (VD)((VL)(ad > vatol + rab) & (VL)one);                                         \
            mabs = PICK(ad > mabs, ad, mabs);                                                      \
            mb = PICK(ab > mb, ab, mb);                                                            \
            reqa = PICK(ra > reqa, ra, reqa);                                                      \
            VL win = ad * reld > reln * ab;                                                        \
            reln = PICK(win, ad, reln);                                                            \
            reld = PICK(win, ab, reld);                                                            \
            win = need * needd > needn * ab;                                                       \
            needn = PICK(win, need, needn);                                                        \
            needd = PICK(win, ab, needd);                                                          \
            sabs += ad;                                                                            \
            sb += ab;                                                                              \
            dot += x * y;                                                                          \
            na += x * x;                                                                           \
            nb += y * y;                                                                           \
        }                                                                                          \
        for (int k = 0; k < W; k++) {                                                              \
            lanes[k] = (lane_t){mabs[k], sabs[k], sb[k], mb[k], reqa[k], dot[k], na[k], nb[k],     \
                                reln[k], reld[k], needn[k], needd[k], bad[k]};                     \
        }                                                                                          \
    }
VECTOR_LOOP(vector4_f32, float, 4, vd4, vl4, vf4, LOAD_F32, MULTIVERSION)
VECTOR_LOOP(vector4_f64, double, 4, vd4, vl4, vf4, LOAD_F64, MULTIVERSION)
#if defined(__x86_64__) && !defined(__clang__)
/* Eight lanes where the CPU has AVX-512 (twice the four-lane speed); four lanes of a wider type
 * than the registers would be slower than scalar code, so the width is chosen at run time. */
#define AVX512 __attribute__((target("avx512f")))
VECTOR_LOOP(vector8_f32, float, 8, vd8, vl8, vf8, LOAD_F32, AVX512)
VECTOR_LOOP(vector8_f64, double, 8, vd8, vl8, vf8, LOAD_F64, AVX512)
static int wide(void) { return __builtin_cpu_supports("avx512f"); }
#else
#define vector8_f32 vector4_f32
#define vector8_f64 vector4_f64
static int wide(void) { return 0; }
#endif
#else /* another compiler: the scalar form, lane by lane */
#define VECTOR_LOOP(NAME, T, W)                                                                    \
    static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, lane_t *lanes) {  \
        for (int k = 0; k < W; k++)                                                                \
            lane_init(&lanes[k]);                                                                  \
        for (size_t i = 0; i < n; i++)                                                             \
            lane_step(&lanes[i % W], a[i], b[i], atol, rtol);                                      \
    }
VECTOR_LOOP(vector4_f32, float, 4)
VECTOR_LOOP(vector4_f64, double, 4)
#define vector8_f32 vector4_f32
#define vector8_f64 vector4_f64
static int wide(void) { return 0; }
#endif

/* Every block of BLOCK elements: its statistics into acc, and the first mismatch found once. */
#define ALL_BLOCKS(NAME, T, VECTOR4, VECTOR8)                                                      \
    static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, acc_t *acc,        \
                     int64_t *first) {                                                             \
        const int w = wide() ? 8 : 4;                                                              \
        for (size_t start = 0; start < n; start += BLOCK) {                                        \
            size_t len = n - start < BLOCK ? n - start : BLOCK, body = len - len % (size_t)w;      \
            lane_t lanes[8];                                                                       \
            if (w == 8)                                                                            \
                VECTOR8(a + start, b + start, body, atol, rtol, lanes);                            \
            else                                                                                   \
                VECTOR4(a + start, b + start, body, atol, rtol, lanes);                            \
            for (size_t i = body; i < len; i++)                                                    \
                lane_step(&lanes[0], a[start + i], b[start + i], atol, rtol);                      \
            int64_t before = acc->n_bad;                                                           \
            for (int k = 0; k < w; k++)                                                            \
                lane_merge(acc, &lanes[k]);                                                        \
            if (acc->n_bad > before && *first < 0) {                                               \
                for (size_t i = 0; i < len; i++) {                                                 \
                    double ad = fabs((double)a[start + i] - (double)b[start + i]);                 \
                    if (ad > atol + rtol * fabs((double)b[start + i])) {                           \
                        *first = (int64_t)(start + i);                                             \
                        break;                                                                     \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }
ALL_BLOCKS(all_f32, float, vector4_f32, vector8_f32)
ALL_BLOCKS(all_f64, double, vector4_f64, vector8_f64)

static PyObject *compare(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a, b;
    int is_double;
    double atol, rtol;
    if (!PyArg_ParseTuple(args, "y*y*pdd", &a, &b, &is_double, &atol, &rtol))
        return NULL;
    const size_t size = is_double ? 8 : 4;
    PyObject *result = NULL;
    if (a.len != b.len || (size_t)a.len % size || ((uintptr_t)a.buf) % size || ((uintptr_t)b.buf) % size) {
        PyErr_SetString(PyExc_ValueError, "compare: the buffers must be the same length, aligned, whole elements");
    } else {
        const size_t n = (size_t)a.len / size;
        acc_t acc = {0};
        acc.req_atol = acc.req_rtol = -INFINITY;
        int64_t first = -1;
        Py_BEGIN_ALLOW_THREADS
        if (is_double)
            all_f64(a.buf, b.buf, n, atol, rtol, &acc, &first);
        else
            all_f32(a.buf, b.buf, n, atol, rtol, &acc, &first);
        Py_END_ALLOW_THREADS
        /* An Inf or a NaN on either side leaves |a - b| or |b|, and so their sum, non-finite (as
         * does a sum of float64 magnitudes beyond 1e308): the exact route counts them. */
        if (!isfinite(acc.sum_abs) || !isfinite(acc.sum_absb)) {
            Py_INCREF(Py_None);
            result = Py_None;
        } else {
            result = Py_BuildValue("(LLdddddddddd)", (long long)acc.n_bad, (long long)first, acc.max_abs,
                                   acc.sum_abs, acc.sum_absb, acc.max_absb, acc.max_rel, acc.req_atol,
                                   acc.req_rtol, acc.dot, acc.norm_a, acc.norm_b);
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"compare", compare, METH_VARARGS,
     "compare(a, b, is_double, atol, rtol) -> (n_bad, first, max_abs, sum_abs, sum_absb, max_absb, "
     "max_rel, req_atol, req_rtol, dot, norm_a, norm_b), or None where either side holds a NaN or "
     "an Inf. a and b: buffers of float32 (float64 where is_double) of one length."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
