/* One read of two float32 (or two float64) tensors for everything compare_tensors measures.
 *
 * metrics.py's torch route widens both chunks to float64 and makes some twenty passes over them
 * (difference, magnitudes, the tolerance test, two ratios, three dot products, a finiteness
 * check); on a trace of a port, where nearly every value differs in its last bits, that is most
 * of a compare. Here each element is read once, widened in a register and every statistic is
 * updated from it, with the same float64 arithmetic per element (compiled without contraction
 * into fused multiply-adds, which would round differently), so the mismatch count, the first
 * mismatch and the maxima are the torch route's exactly, the two largest ratios to an ulp and the
 * sums to rounding (4 or 8 float64 lanes per 1024-element block instead of torch's pairwise
 * order; with AVX2 or AVX-512 the three dot products are fused multiply-adds, which only sums
 * see). Three loops, chosen at run time: AVX-512 (8 lanes), AVX2 with FMA (4), portable (4).
 * Where either side holds a NaN or an Inf the kernel says so and metrics.py takes its exact
 * route, which counts them. The GIL is released: the comparisons of a trace run side by side
 * on every core. Python never passes a pointer here:
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
    double max_abs, sum_abs, sum_absb, max_absb, req_atol, dot, norm_a, norm_b;
    double rel_n, rel_d, need_n, need_d; /* the two largest ratios as pairs, divided at the end */
    int64_t n_bad;
} acc_t;

static void acc_init(acc_t *acc) {
    memset(acc, 0, sizeof *acc);
    acc->req_atol = -INFINITY;
    acc->rel_d = acc->need_d = 1.0; /* both ratios start at 0: what a lane that never wins gives */
}

static double max2(double x, double y) { return x > y ? x : y; }

/* The largest of the ratios num/den seen so far is kept as the pair (num, den), den >= 0, and
 * candidates are compared by cross-multiplication, so no element costs a division: den == 0
 * stands for +Inf where num > 0 (metrics.py's rule for a zero |b|) and never wins where num <= 0.
 * The winner is divided once at the end; where the products round (values of very different
 * magnitudes) it may be a neighbour of the largest quotient within an ulp. */
static double quotient(double num, double den) { return den > 0 ? num / den : (num > 0 ? INFINITY : 0.0); }

/* A threshold t with num' > t * den' for every candidate (num', den') that could beat the pair
 * (num, den): the quotient lowered by 2^-40 relative, far beyond the products' rounding, so a
 * candidate it turns away loses the cross-multiplication too. The vector loops test it (one
 * multiply and a compare per ratio) and cross-multiply only where it lets a candidate through,
 * which after a block's first elements is rare. */
static double floor_of(double num, double den) { return den > 0 ? (num / den) * (1.0 - 0x1p-40) : (num > 0 ? INFINITY : 0.0); }

/* Per-lane running statistics of one block: sums and maxima from zero, the ratio pairs from
 * the accumulator's (a lane keeps a candidate only where it beats every earlier block). */
typedef struct {
    double mabs, sabs, sb, mb, reqa, dot, na, nb, reln, reld, needn, needd, bad;
} lane_t;

static inline void lane_init(lane_t *l, const acc_t *acc) {
    l->mabs = l->sabs = l->sb = l->mb = l->dot = l->na = l->nb = l->bad = 0.0;
    l->reln = acc->rel_n;
    l->reld = acc->rel_d;
    l->needn = acc->need_n;
    l->needd = acc->need_d;
    l->reqa = -INFINITY;
}

/* The two ratio pairs' cross-multiplications for one element (|a - b|, |b|, |a - b| - atol). */
static inline void lane_ratios(lane_t *l, double ad, double ab, double need) {
    if (ad * l->reld > l->reln * ab) {
        l->reln = ad;
        l->reld = ab;
    }
    if (need * l->needd > l->needn * ab) {
        l->needn = need;
        l->needd = ab;
    }
}

/* One element into one lane: the scalar form of the vector loop below, for the tail of a block. */
static void lane_step(lane_t *l, double x, double y, double atol, double rtol) {
    double ad = fabs(x - y), ab = fabs(y), rab = rtol * ab, ra = ad - rab, need = ad - atol;
    l->bad += ad > atol + rab ? 1.0 : 0.0;
    l->mabs = max2(l->mabs, ad);
    l->mb = max2(l->mb, ab);
    l->reqa = max2(l->reqa, ra);
    lane_ratios(l, ad, ab, need);
    l->sabs += ad;
    l->sb += ab;
    l->dot += x * y;
    l->na += x * x;
    l->nb += y * y;
}

static void lane_merge(acc_t *acc, const lane_t *l) {
    acc->max_abs = max2(acc->max_abs, l->mabs);
    acc->max_absb = max2(acc->max_absb, l->mb);
    if (l->reln * acc->rel_d > acc->rel_n * l->reld) {
        acc->rel_n = l->reln;
        acc->rel_d = l->reld;
    }
    if (l->needn * acc->need_d > acc->need_n * l->needd) {
        acc->need_n = l->needn;
        acc->need_d = l->needd;
    }
    acc->req_atol = max2(acc->req_atol, l->reqa);
    acc->sum_abs += l->sabs;
    acc->sum_absb += l->sb;
    acc->dot += l->dot;
    acc->norm_a += l->na;
    acc->norm_b += l->nb;
    acc->n_bad += (int64_t)l->bad;
}

/* Which vector loop the CPU runs: AVX-512 (eight float64 lanes), AVX2 with FMA (four), or
 * portable four-lane code (SSE2 on x86-64). */
enum { ISA_PLAIN, ISA_AVX2, ISA_AVX512 };

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

/* Each lane's two thresholds (floor_of its pairs) into rel_at and need_at. */
static void thresholds(const lane_t *lanes, int w, double *rel_at, double *need_at) {
    for (int k = 0; k < w; k++) {
        rel_at[k] = floor_of(lanes[k].reln, lanes[k].reld);
        need_at[k] = floor_of(lanes[k].needn, lanes[k].needd);
    }
}

/* The rare step where a threshold let a candidate through: the exact cross-multiplications for
 * the W elements at a and b (their |a - b|, |b| and |a - b| - atol computed as the vector loop
 * computes them), and the thresholds again. Kept out of line, reading the elements again, so
 * that the vector loop's registers hold its accumulators and it stores nothing. */
#define RATIOS_OF(NAME, T)                                                                         \
    __attribute__((noinline)) static void NAME(lane_t *lanes, int w, const T *a, const T *b, double atol, \
                                               double *rel_at, double *need_at) {                  \
        for (int k = 0; k < w; k++) {                                                              \
            const double x = a[k], y = b[k], ad = fabs(x - y);                                     \
            lane_ratios(&lanes[k], ad, fabs(y), ad - atol);                                        \
        }                                                                                          \
        thresholds(lanes, w, rel_at, need_at);                                                     \
    }
RATIOS_OF(ratios_of_f32, float)
RATIOS_OF(ratios_of_f64, double)
#define ratios_of(LANES, W, A, B, ATOL, REL_AT, NEED_AT) \
    _Generic((A), const float *: ratios_of_f32, const double *: ratios_of_f64)(LANES, W, A, B, ATOL, REL_AT, NEED_AT)

/* Elements [0, n) with n a multiple of W, into W lanes (their ratio pairs read from lanes). */
#define VECTOR_LOOP(NAME, T, W, VD, VL, VF, LOAD, MAX, COUNT, MULADD, ANY, ATTR)                   \
    ATTR static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, lane_t *lanes) { \
        const VD zero = {0}, one = zero + 1.0, vatol = zero + atol, vrtol = zero + rtol;           \
        const VL absmask = (VL){0} + INT64_MAX;                                                    \
        VD mabs = zero, sabs = zero, sb = zero, mb = zero, dot = zero, na = zero, nb = zero;       \
        VD bad = zero, reqa = zero - INFINITY, rel_at = zero, need_at = zero;                      \
        int64_t nbad = 0; /* the count where COUNT keeps it in an integer register */               \
        (void)one;                                                                                 \
        thresholds(lanes, W, (double *)&rel_at, (double *)&need_at);                               \
        for (size_t i = 0; i < n; i += W) {                                                        \
            VD x, y;                                                                               \
            LOAD(VD, VF, x, a + i);                                                                \
            LOAD(VD, VF, y, b + i);                                                                \
            VD ad = (VD)((VL)(x - y) & absmask), ab = (VD)((VL)y & absmask);                       \
            VD rab = vrtol * ab, ra = ad - rab, need = ad - vatol;                                 \
            COUNT(bad, nbad, ad, vatol + rab, one);                                                \
            mabs = MAX(ad, mabs);                                                                  \
            mb = MAX(ab, mb);                                                                      \
            reqa = MAX(ra, reqa);                                                                  \
            if (__builtin_expect(ANY((ad > rel_at * ab) | (need > need_at * ab)), 0))              \
                ratios_of(lanes, W, a + i, b + i, atol, (double *)&rel_at, (double *)&need_at);    \
            sabs += ad;                                                                            \
            sb += ab;                                                                              \
            dot = MULADD(dot, x, y);                                                               \
            na = MULADD(na, x, x);                                                                 \
            nb = MULADD(nb, y, y);                                                                 \
        }                                                                                          \
        for (int k = 0; k < W; k++) {                                                              \
            lane_t *l = &lanes[k];                                                                 \
            l->mabs = mabs[k], l->sabs = sabs[k], l->sb = sb[k], l->mb = mb[k], l->reqa = reqa[k]; \
            l->dot = dot[k], l->na = na[k], l->nb = nb[k], l->bad = bad[k];                        \
        }                                                                                          \
        lanes[0].bad += (double)nbad;                                                              \
    }
/* max(x, y) as x > y ? x : y (y where either is NaN: what MAXPD computes, below). */
#define PICK_MAX(X, Y) PICK((X) > (Y), X, Y)
/* n + (x > y ? 1 : 0) per lane. */
#define MASK_COUNT(N, NI, X, Y, ONE) \
    (N) = ((N) + (__typeof__(N))((__typeof__((X) > (Y)))((X) > (Y)) & (__typeof__((X) > (Y)))(ONE)))
/* acc + x * y, rounded twice. */
#define MUL_ADD(ACC, X, Y) ((ACC) + (X) * (Y))
/* Whether any lane of a four-lane mask is set. */
#define ANY4(M) (((M)[0] | (M)[1] | (M)[2] | (M)[3]) != 0)
VECTOR_LOOP(vector4_f32, float, 4, vd4, vl4, vf4, LOAD_F32, PICK_MAX, MASK_COUNT, MUL_ADD, ANY4, )
VECTOR_LOOP(vector4_f64, double, 4, vd4, vl4, vf4, LOAD_F64, PICK_MAX, MASK_COUNT, MUL_ADD, ANY4, )
#if defined(__x86_64__) && !defined(__clang__)
#include <immintrin.h>
/* AVX2 with FMA (x86-64 from 2013 on, AMD's Zen included): the same loop from intrinsics. GCC's
 * own forms of these spill the accumulators to the stack and split every float32 load in two
 * halves through memory (measured: 1.43 ns per float32 element; these ~0.8). */
#define AVX2 __attribute__((target("avx2,fma,popcnt")))
#define LOAD_F32_256(VD, VF, DST, P) DST = (VD)_mm256_cvtps_pd(_mm_loadu_ps(P))
#define MAX_256(X, Y) ((vd4)_mm256_max_pd((__m256d)(X), (__m256d)(Y)))
/* The three dot products' sums by fused multiply-adds: rounded once, not twice (they are sums,
 * reported to rounding; every count, maximum and ratio keeps the unfused arithmetic). */
#define FMA_256(ACC, X, Y) ((vd4)_mm256_fmadd_pd((__m256d)(X), (__m256d)(Y), (__m256d)(ACC)))
#define ANY_256(M) (_mm256_movemask_pd((__m256d)(M)) != 0)
/* The count in an integer register: one vector accumulator fewer (sixteen registers are tight). */
#define COUNT_256(N, NI, X, Y, ONE) (NI) += __builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_cmp_pd((__m256d)(X), (__m256d)(Y), _CMP_GT_OQ)))
VECTOR_LOOP(vector4_f32_avx2, float, 4, vd4, vl4, vf4, LOAD_F32_256, MAX_256, COUNT_256, FMA_256, ANY_256, AVX2)
VECTOR_LOOP(vector4_f64_avx2, double, 4, vd4, vl4, vf4, LOAD_F64, MAX_256, COUNT_256, FMA_256, ANY_256, AVX2)
/* Eight lanes where the CPU has AVX-512 (twice the four-lane speed); four lanes of a wider type
 * than the registers would be slower than scalar code, so the width is chosen at run time. */
#define AVX512 __attribute__((target("avx512f")))
/* One vcvtps2pd from memory: GCC splits __builtin_convertvector of eight floats in two halves
 * and a reload (six instructions more per eight elements); the values are the same. */
#define LOAD_F32_512(VD, VF, DST, P) DST = (VD)_mm512_cvtps_pd(_mm256_loadu_ps(P))
/* One VMAXPD, the same x > y ? x : y (a compare and a blend otherwise). */
#define MAX_512(X, Y) ((vd8)_mm512_max_pd((__m512d)(X), (__m512d)(Y)))
/* One compare into a mask and one masked add. */
#define COUNT_512(N, NI, X, Y, ONE) \
    (N) = ((vd8)_mm512_mask_add_pd((__m512d)(N), _mm512_cmp_pd_mask((__m512d)(X), (__m512d)(Y), _CMP_GT_OQ), (__m512d)(N), (__m512d)(ONE)))
/* As FMA_256: the FP adders are what bounds this loop, and the fused products free three of
 * their slots. */
#define FMA_512(ACC, X, Y) ((vd8)_mm512_fmadd_pd((__m512d)(X), (__m512d)(Y), (__m512d)(ACC)))
#define ANY_512(M) (_mm512_test_epi64_mask((__m512i)(M), (__m512i)(M)) != 0)
VECTOR_LOOP(vector8_f32, float, 8, vd8, vl8, vf8, LOAD_F32_512, MAX_512, COUNT_512, FMA_512, ANY_512, AVX512)
VECTOR_LOOP(vector8_f64, double, 8, vd8, vl8, vf8, LOAD_F64, MAX_512, COUNT_512, FMA_512, ANY_512, AVX512)
static int isa(void) {
    return __builtin_cpu_supports("avx512f") ? ISA_AVX512
           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? ISA_AVX2 : ISA_PLAIN;
}
#else
#define vector8_f32 vector4_f32
#define vector8_f64 vector4_f64
#define vector4_f32_avx2 vector4_f32
#define vector4_f64_avx2 vector4_f64
static int isa(void) { return ISA_PLAIN; }
#endif
#else /* another compiler: the scalar form, lane by lane */
#define VECTOR_LOOP(NAME, T, W)                                                                    \
    static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, lane_t *lanes) {  \
        for (size_t i = 0; i < n; i++)                                                             \
            lane_step(&lanes[i % W], a[i], b[i], atol, rtol);                                      \
    }
VECTOR_LOOP(vector4_f32, float, 4)
VECTOR_LOOP(vector4_f64, double, 4)
#define vector8_f32 vector4_f32
#define vector8_f64 vector4_f64
#define vector4_f32_avx2 vector4_f32
#define vector4_f64_avx2 vector4_f64
static int isa(void) { return ISA_PLAIN; }
#endif

/* One block of len <= BLOCK elements at flat position start: its statistics into acc, and the
 * first mismatch found once (a and b point at the block's own elements). */
#define ONE_BLOCK(NAME, T, VECTOR4, VECTOR4_AVX2, VECTOR8)                                         \
    static void NAME(const T *a, const T *b, size_t len, size_t start, int kind, double atol,       \
                     double rtol, acc_t *acc, int64_t *first) {                                    \
        const int w = kind == ISA_AVX512 ? 8 : 4;                                                  \
        size_t body = len - len % (size_t)w;                                                       \
        lane_t lanes[8];                                                                           \
        for (int k = 0; k < w; k++)                                                                \
            lane_init(&lanes[k], acc);                                                             \
        if (kind == ISA_AVX512)                                                                    \
            VECTOR8(a, b, body, atol, rtol, lanes);                                                \
        else if (kind == ISA_AVX2)                                                                 \
            VECTOR4_AVX2(a, b, body, atol, rtol, lanes);                                           \
        else                                                                                       \
            VECTOR4(a, b, body, atol, rtol, lanes);                                                \
        for (size_t i = body; i < len; i++)                                                        \
            lane_step(&lanes[0], a[i], b[i], atol, rtol);                                          \
        int64_t before = acc->n_bad;                                                               \
        for (int k = 0; k < w; k++)                                                                \
            lane_merge(acc, &lanes[k]);                                                            \
        if (acc->n_bad > before && *first < 0) {                                                   \
            for (size_t i = 0; i < len; i++) {                                                     \
                double ad = fabs((double)a[i] - (double)b[i]);                                     \
                if (ad > atol + rtol * fabs((double)b[i])) {                                       \
                    *first = (int64_t)(start + i);                                                 \
                    break;                                                                         \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }
ONE_BLOCK(block_f32, float, vector4_f32, vector4_f32_avx2, vector8_f32)
ONE_BLOCK(block_f64, double, vector4_f64, vector4_f64_avx2, vector8_f64)

/* Every block of BLOCK elements: its statistics into acc, and the first mismatch found once. */
#define ALL_BLOCKS(NAME, T, BLOCK_FN)                                                              \
    static void NAME(const T *a, const T *b, size_t n, double atol, double rtol, acc_t *acc,        \
                     int64_t *first) {                                                             \
        const int kind = isa();                                                                    \
        for (size_t start = 0; start < n; start += BLOCK) {                                        \
            size_t len = n - start < BLOCK ? n - start : BLOCK;                                    \
            BLOCK_FN(a + start, b + start, len, start, kind, atol, rtol, acc, first);              \
        }                                                                                          \
    }
ALL_BLOCKS(all_f32, float, block_f32)
ALL_BLOCKS(all_f64, double, block_f64)

/* How a row's index reorders it, where it follows one of the two most common layouts (RoPE's
 * interleaved halves, a "(two h) -> (h two)" rearrange), in segments of seg elements:
 * INTERLEAVE: B's 2q + p is A's p * half + q (two runs of half woven together);
 * DEINTERLEAVE: B's q * half + p is A's 2p + q (the even elements, then the odd ones). */
enum { SHUFFLE_NONE, SHUFFLE_INTERLEAVE, SHUFFLE_DEINTERLEAVE };
typedef struct {
    int kind;
    size_t half, seg;
} shuffle_t;

/* The index's layout, checked element by element (m elements, a permutation of [0, m)). */
static shuffle_t shuffle_of(const int64_t *idx, size_t m) {
    shuffle_t none = {SHUFFLE_NONE, 0, 0};
    if (m < 16 || idx[0] != 0)
        return none;
    if (idx[1] > 1) { /* woven: idx[1] is half */
        shuffle_t sh = {SHUFFLE_INTERLEAVE, (size_t)idx[1], 2 * (size_t)idx[1]};
        int ok = sh.half >= 8 && m % sh.seg == 0;
        for (size_t j = 0; ok && j < m; j++) {
            const size_t r = j % sh.seg;
            ok = (size_t)idx[j] == j - r + (r % 2) * sh.half + r / 2;
        }
        if (ok)
            return sh;
    }
    if (idx[1] == 2) { /* even elements first: half is where 1 comes */
        size_t half = 0;
        for (size_t j = 1; j < m && !half; j++)
            half = idx[j] == 1 ? j : 0;
        shuffle_t sh = {SHUFFLE_DEINTERLEAVE, half, 2 * half};
        int ok = half >= 8 && m % sh.seg == 0;
        for (size_t j = 0; ok && j < m; j++) {
            const size_t r = j % sh.seg;
            ok = (size_t)idx[j] == j - r + 2 * (r % half) + r / half;
        }
        if (ok)
            return sh;
    }
    return none;
}

/* j elements further along B's row: r, its place in its segment, and base, where that begins. */
#define STEP(K)                                                                                    \
    do {                                                                                           \
        j += (K);                                                                                  \
        r += (K);                                                                                  \
        if (r == seg) {                                                                            \
            r = 0;                                                                                 \
            base += seg;                                                                           \
        }                                                                                          \
    } while (0)

/* to[j] = from[at[j]] for j < take: four loads in flight before their stores. */
#define GATHER_SCALAR(NAME, T)                                                                     \
    static inline void NAME(const T *from, const int64_t *at, T *to, size_t take) {                \
        size_t j = 0;                                                                              \
        for (; j + 4 <= take; j += 4) {                                                            \
            T x0 = from[at[j]], x1 = from[at[j + 1]], x2 = from[at[j + 2]], x3 = from[at[j + 3]];  \
            to[j] = x0;                                                                            \
            to[j + 1] = x1;                                                                        \
            to[j + 2] = x2;                                                                        \
            to[j + 3] = x3;                                                                        \
        }                                                                                          \
        for (; j < take; j++)                                                                      \
            to[j] = from[at[j]];                                                                   \
    }
GATHER_SCALAR(gather_scalar_f32, float)
GATHER_SCALAR(gather_scalar_f64, double)

/* A row of B in one of the two layouts, from A's row: W_IN elements at a time by WEAVE where an
 * interleaved run fits whole (two runs of A woven), W_OUT by SPLIT where a deinterleaved one
 * does (the even or the odd elements of a run of A), the rest element by element; the same
 * elements as the index gives. r, B's place in its segment, is kept without a division a step. */
#define SHUFFLED(NAME, ATTR, W_IN, WEAVE, W_OUT, SPLIT)                                            \
    ATTR static void NAME(const float *from, const int64_t *at, size_t c, size_t take, float *to,   \
                          const shuffle_t *sh) {                                                   \
        const size_t seg = sh->seg, half = sh->half;                                               \
        size_t j = 0, r = c % seg, base = c - r;                                                   \
        while (j < take) {                                                                         \
            if (sh->kind == SHUFFLE_INTERLEAVE) {                                                  \
                if (r % 2 == 0 && r + (W_IN) <= seg && j + (W_IN) <= take) {                       \
                    WEAVE(from + base + r / 2, from + base + half + r / 2, to + j);               \
                    STEP(W_IN);                                                                    \
                    continue;                                                                      \
                }                                                                                  \
            } else {                                                                               \
                const size_t q = r >= half, p = r - q * half;                                      \
                if (p + (W_OUT) <= half && j + (W_OUT) <= take) {                                  \
                    SPLIT(from + base + 2 * p, q, to + j);                                         \
                    STEP(W_OUT);                                                                   \
                    continue;                                                                      \
                }                                                                                  \
            }                                                                                      \
            to[j] = from[at[j]];                                                                   \
            STEP(1);                                                                               \
        }                                                                                          \
    }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TP_SCALAR)
#include <immintrin.h>
/* SSE (every x86-64 CPU): eight elements woven from two loads and two unpacks; four split from
 * two loads and one shuffle. */
#define WEAVE_128(LO, HI, TO)                                                                      \
    do {                                                                                           \
        const __m128 lo_ = _mm_loadu_ps(LO), hi_ = _mm_loadu_ps(HI);                               \
        _mm_storeu_ps((TO), _mm_unpacklo_ps(lo_, hi_));                                            \
        _mm_storeu_ps((TO) + 4, _mm_unpackhi_ps(lo_, hi_));                                        \
    } while (0)
#define SPLIT_128(FROM, ODD, TO)                                                                   \
    do {                                                                                           \
        const __m128 x0_ = _mm_loadu_ps(FROM), x1_ = _mm_loadu_ps((FROM) + 4);                     \
        _mm_storeu_ps((TO), (ODD) ? _mm_shuffle_ps(x0_, x1_, _MM_SHUFFLE(3, 1, 3, 1))              \
                                  : _mm_shuffle_ps(x0_, x1_, _MM_SHUFFLE(2, 0, 2, 0)));            \
    } while (0)
SHUFFLED(shuffled_f32_128, , 8, WEAVE_128, 4, SPLIT_128)
#define HAVE_SHUFFLED_128 1
#if !defined(__clang__)
/* AVX-512: sixteen elements woven from two loads and one permute; eight split from one load
 * and one permute. */
#define WEAVE_512(LO, HI, TO)                                                                      \
    _mm512_storeu_ps((TO), _mm512_permutex2var_ps(                                                 \
        _mm512_castps256_ps512(_mm256_loadu_ps(LO)),                                               \
        _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0),                  \
        _mm512_castps256_ps512(_mm256_loadu_ps(HI))))
#define SPLIT_512(FROM, ODD, TO)                                                                   \
    do {                                                                                           \
        const __m512d both_ = _mm512_castps_pd(_mm512_permutexvar_ps(                              \
            _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0), _mm512_loadu_ps(FROM))); \
        _mm256_storeu_pd((double *)(void *)(TO), (ODD) ? _mm512_extractf64x4_pd(both_, 1)          \
                                                       : _mm512_castpd512_pd256(both_));           \
    } while (0)
SHUFFLED(shuffled_f32_512, AVX512, 16, WEAVE_512, 8, SPLIT_512)
#define HAVE_SHUFFLED_512 1
#endif
#endif

static void row_f32(const float *from, const int64_t *at, size_t c, size_t take, float *to, const shuffle_t *sh,
                    int kind) {
#ifdef HAVE_SHUFFLED_512
    if (kind == ISA_AVX512 && sh->kind != SHUFFLE_NONE) {
        shuffled_f32_512(from, at, c, take, to, sh);
        return;
    }
#endif
#ifdef HAVE_SHUFFLED_128
    if (sh->kind != SHUFFLE_NONE) {
        shuffled_f32_128(from, at, c, take, to, sh);
        return;
    }
#endif
    (void)c;
    (void)sh;
    (void)kind;
    gather_scalar_f32(from, at, to, take);
}

static void row_f64(const double *from, const int64_t *at, size_t c, size_t take, double *to, const shuffle_t *sh,
                    int kind) {
    (void)c;
    (void)sh;
    (void)kind;
    gather_scalar_f64(from, at, to, take);
}

/* Whether row_f32 reads a shuffled layout's rows in runs (then rows are read in place). */
#if defined(HAVE_SHUFFLED_128)
#define SHUFFLED_ROWS(KIND) 1
#elif defined(HAVE_SHUFFLED_512)
#define SHUFFLED_ROWS(KIND) ((KIND) == ISA_AVX512)
#else
#define SHUFFLED_ROWS(KIND) 0
#endif

/* The same blocks where A is gathered on one axis: A's elements, a C-order array of shape
 * (outer, size, inner), are read as A.index_select(1, index), of shape (outer, m, inner) like B.
 * Each block's gathered elements are copied into a buffer that stays in L1, then measured by
 * the very code above in the same order, so every statistic is what the kernel gives for the
 * gathered copy, bit for bit, without writing that copy to memory. *same stays 1 while the
 * gathered bytes equal B's (what a byte comparison of the copy would say). */
#define GATHERED_BLOCKS(NAME, T, BLOCK_FN, ROW_FN)                                                 \
    static void NAME(const T *a, const T *b, const int64_t *index, size_t outer, size_t size,      \
                     size_t m, size_t inner, double atol, double rtol, acc_t *acc, int64_t *first,  \
                     int *same, const shuffle_t *shuffle) {                                        \
        const int kind = isa();                                                                    \
        const size_t n = outer * m * inner;                                                        \
        enum { ROW = (16 << 10) / sizeof(T) }; /* read out of order from memory, a row would wait on \
                                                  * every element; copied in order, on none */   \
        T buf[BLOCK], row[ROW];                                                                    \
        /* a shuffled layout reads its rows in runs, in order: no copy */                          \
        const int copy_rows = size <= ROW && (shuffle->kind == SHUFFLE_NONE || !SHUFFLED_ROWS(kind)); \
        size_t o = 0, c = 0, i = 0, held = (size_t)-1; /* B's position of the next element */       \
        for (size_t start = 0; start < n; start += BLOCK) {                                        \
            size_t len = n - start < BLOCK ? n - start : BLOCK;                                    \
            for (size_t k = 0; k < len;) {                                                         \
                if (inner == 1) { /* the last axis gathered: a run of one row's elements */         \
                    if (o != held) { /* a row that fits is first copied in order, then read from L1 */ \
                        if (copy_rows)                                                             \
                            memcpy(row, a + o * size, size * sizeof(T));                           \
                        else if (o + 1 < outer && size <= ROW) /* the next row on its way */       \
                            for (size_t l = 0; l < size; l += 64 / sizeof(T))                      \
                                __builtin_prefetch(a + (o + 1) * size + l);                        \
                        held = o;                                                                  \
                    }                                                                              \
                    const T *from = copy_rows ? row : a + o * size;                                \
                    const size_t take = m - c < len - k ? m - c : len - k;                         \
                    ROW_FN(from, index + c, c, take, buf + k, shuffle, kind);                      \
                    k += take;                                                                     \
                    c += take;                                                                     \
                } else { /* a run of inner elements, contiguous in A */                            \
                    const size_t run = inner - i < len - k ? inner - i : len - k;                  \
                    memcpy(buf + k, a + (o * size + (size_t)index[c]) * inner + i, run * sizeof(T)); \
                    k += run;                                                                      \
                    i += run;                                                                      \
                    if (i < inner)                                                                 \
                        continue;                                                                  \
                    i = 0;                                                                         \
                    c++;                                                                           \
                }                                                                                  \
                if (c == m) {                                                                      \
                    c = 0;                                                                         \
                    o++;                                                                           \
                }                                                                                  \
            }                                                                                      \
            if (*same && memcmp(buf, b + start, len * sizeof(T)) != 0)                             \
                *same = 0;                                                                         \
            BLOCK_FN(buf, b + start, len, start, kind, atol, rtol, acc, first);                    \
        }                                                                                          \
    }
GATHERED_BLOCKS(gathered_f32, float, block_f32, row_f32)
GATHERED_BLOCKS(gathered_f64, double, block_f64, row_f64)

/* The statistics as compare() hands them back, or None where an Inf or a NaN was met. */
static PyObject *result_of(const acc_t *acc, int64_t first) {
    /* An Inf or a NaN on either side leaves |a - b| or |b|, and so their sum, non-finite (as
     * does a sum of float64 magnitudes beyond 1e308): the exact route counts them. */
    if (!isfinite(acc->sum_abs) || !isfinite(acc->sum_absb))
        Py_RETURN_NONE;
    return Py_BuildValue("(LLdddddddddd)", (long long)acc->n_bad, (long long)first, acc->max_abs, acc->sum_abs,
                         acc->sum_absb, acc->max_absb, quotient(acc->rel_n, acc->rel_d), acc->req_atol,
                         quotient(acc->need_n, acc->need_d), acc->dot,
                         acc->norm_a, acc->norm_b);
}

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
        acc_t acc;
        acc_init(&acc);
        int64_t first = -1;
        Py_BEGIN_ALLOW_THREADS
        if (is_double)
            all_f64(a.buf, b.buf, n, atol, rtol, &acc, &first);
        else
            all_f32(a.buf, b.buf, n, atol, rtol, &acc, &first);
        Py_END_ALLOW_THREADS
        result = result_of(&acc, first);
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyObject *compare_gathered(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a, b, index;
    int is_double;
    double atol, rtol;
    Py_ssize_t outer, size, inner;
    if (!PyArg_ParseTuple(args, "y*y*y*pddnnn", &a, &b, &index, &is_double, &atol, &rtol, &outer, &size, &inner))
        return NULL;
    const size_t esize = is_double ? 8 : 4;
    PyObject *result = NULL;
    const size_t m = (size_t)index.len / sizeof(int64_t);
    int ok = outer >= 0 && size >= 0 && inner >= 0 && (size_t)index.len % sizeof(int64_t) == 0 &&
             ((uintptr_t)index.buf) % sizeof(int64_t) == 0 && ((uintptr_t)a.buf) % esize == 0 &&
             ((uintptr_t)b.buf) % esize == 0 && (size_t)a.len == (size_t)outer * (size_t)size * (size_t)inner * esize &&
             (size_t)b.len == (size_t)outer * m * (size_t)inner * esize;
    const int64_t *idx = index.buf;
    for (size_t c = 0; ok && c < m; c++)
        ok = idx[c] >= 0 && idx[c] < (int64_t)size;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "compare_gathered: a must hold outer*size*inner elements, "
                                          "b outer*len(index)*inner, every index in [0, size), all aligned");
    } else {
        acc_t acc;
        acc_init(&acc);
        int64_t first = -1;
        int same = 1;
        Py_BEGIN_ALLOW_THREADS
        const shuffle_t shuffle = inner == 1 && m == (size_t)size ? shuffle_of(idx, m) : (shuffle_t){SHUFFLE_NONE, 0, 0};
        if (is_double)
            gathered_f64(a.buf, b.buf, idx, (size_t)outer, (size_t)size, m, (size_t)inner, atol, rtol, &acc, &first,
                         &same, &shuffle);
        else
            gathered_f32(a.buf, b.buf, idx, (size_t)outer, (size_t)size, m, (size_t)inner, atol, rtol, &acc, &first,
                         &same, &shuffle);
        Py_END_ALLOW_THREADS
        PyObject *stats = result_of(&acc, first);
        if (stats != NULL) {
            result = Py_BuildValue("(NO)", stats, same ? Py_True : Py_False);
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&index);
    return result;
}

/* The first element i < limit outside the tolerance, !(|a - b| <= atol + rtol * |b|), or one
 * holding an Inf or a NaN on either side (the caller cannot judge those); -1 where none is:
 * whether a comparison fails, without measuring it. Blocks are tested with a branch-free loop
 * the compiler vectorises; the block that holds one is searched element by element. The
 * arithmetic is compare()'s (float64, no fused multiply-adds). With scale > 0 atol is first
 * raised to scale * max|b| over all n elements, as metrics._scaled raises it from compare()'s
 * max|b| (-2 where that maximum is not finite: compare() would not decide either). */
#define INSIDE(X, Y, ATOL, RTOL) ((fabs((X) - (Y)) <= (ATOL) + (RTOL) * fabs(Y)) & (fabs(X) < INFINITY) & (fabs(Y) < INFINITY))
/* max|b| of n elements: the largest magnitude's bits, compared as integers (magnitudes order as
 * their bits do, sign cleared), which vectorises; Inf or NaN where the bits say so. */
#define MAX_ABS(NAME, T, U, MASK)                                                                  \
    MULTIVERSION static double NAME(const T *b, size_t n) {                                                     \
        U m = 0;                                                                                   \
        for (size_t i = 0; i < n; i++) {                                                           \
            U bits;                                                                                \
            memcpy(&bits, b + i, sizeof bits);                                                     \
            bits &= MASK;                                                                          \
            m = bits > m ? bits : m;                                                               \
        }                                                                                          \
        T out;                                                                                     \
        memcpy(&out, &m, sizeof out);                                                              \
        return (double)out;                                                                        \
    }
MAX_ABS(max_abs_f32, float, uint32_t, 0x7fffffffu)
MAX_ABS(max_abs_f64, double, uint64_t, 0x7fffffffffffffffull)

#define FIRST_OUTSIDE(NAME, T, MAX_ABS_FN)                                                         \
    MULTIVERSION static int64_t NAME(const T *a, const T *b, size_t n, size_t limit, double atol, double rtol,   \
                        double scale) {                                                            \
        if (scale > 0) {                                                                           \
            double m = MAX_ABS_FN(b, n);                                                           \
            if (!isfinite(m))                                                                      \
                return -2;                                                                         \
            double raised = scale * m;                                                             \
            if (raised > atol)                                                                     \
                atol = raised;                                                                     \
        }                                                                                          \
        for (size_t start = 0; start < limit; start += BLOCK) {                                    \
            size_t len = limit - start < BLOCK ? limit - start : BLOCK;                            \
            int outside = 0;                                                                       \
            for (size_t i = 0; i < len; i++) {                                                     \
                double x = a[start + i], y = b[start + i];                                         \
                outside |= !INSIDE(x, y, atol, rtol);                                              \
            }                                                                                      \
            if (outside) {                                                                         \
                for (size_t i = 0; i < len; i++) {                                                 \
                    double x = a[start + i], y = b[start + i];                                     \
                    if (!INSIDE(x, y, atol, rtol))                                                 \
                        return (int64_t)(start + i);                                               \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        return -1;                                                                                 \
    }
FIRST_OUTSIDE(first_outside_f32, float, max_abs_f32)
FIRST_OUTSIDE(first_outside_f64, double, max_abs_f64)

static PyObject *first_outside(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a, b;
    int is_double;
    double atol, rtol, scale;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*y*pddnd", &a, &b, &is_double, &atol, &rtol, &limit, &scale))
        return NULL;
    const size_t size = is_double ? 8 : 4;
    PyObject *result = NULL;
    if (a.len != b.len || (size_t)a.len % size || ((uintptr_t)a.buf) % size || ((uintptr_t)b.buf) % size) {
        PyErr_SetString(PyExc_ValueError, "first_outside: the buffers must be the same length, aligned, whole elements");
    } else {
        const size_t n = (size_t)a.len / size;
        const size_t upto = limit >= 0 && (size_t)limit < n ? (size_t)limit : n;
        int64_t found;
        Py_BEGIN_ALLOW_THREADS
        found = is_double ? first_outside_f64(a.buf, b.buf, n, upto, atol, rtol, scale)
                          : first_outside_f32(a.buf, b.buf, n, upto, atol, rtol, scale);
        Py_END_ALLOW_THREADS
        result = PyLong_FromLongLong((long long)found);
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
    {"compare_gathered", compare_gathered, METH_VARARGS,
     "compare_gathered(a, b, index, is_double, atol, rtol, outer, size, inner) -> (compare()'s tuple or None, "
     "same bytes): A, of shape (outer, size, inner), gathered on its middle axis by index (int64) and compared "
     "with B, of shape (outer, len(index), inner), as compare() would compare the gathered copy."},
    {"first_outside", first_outside, METH_VARARGS,
     "first_outside(a, b, is_double, atol, rtol, limit, scale) -> the flat index of the first of the first `limit` "
     "elements (all where limit < 0) with not |a - b| <= atol + rtol * |b| (NaN included), or -1; atol raised to "
     "scale * max|b| first where scale > 0 (-2 where max|b| is not finite)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
