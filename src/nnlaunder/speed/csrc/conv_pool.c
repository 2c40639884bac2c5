/* A network's first stage fused for a CPU: conv (few input channels, stride 1, on an already zero-padded
   input) -> 2x2 max-pool (stride 2, floor) -> optional ReLU, forward and input gradient, in fp32.

   Built at first use by nnlaunder/speed/native.py (cc -O3 -march=native -fopenmp) and called through ctypes on
   contiguous tensors; the Python side checks every shape before a call. Loaded after torch, the OpenMP
   runtime is torch's own (the same soname), so its threads are the library's.

   Why: the library runs this stage as a dense conv, a pool that writes int64 indices, a zero-filled
   (N, C, 2H', 2W') pool gradient and a conv input gradient, all memory-bound at Neural Cleanse's batch
   sizes. Here each pooled output is computed from its four window positions at once, and its gradient
   goes to one (cin, k+1, k+1) patch of the input: a quarter of the dense gradient's arithmetic. */
#include <stdint.h>
#include <string.h>

/* One vector of VW floats: 16 with AVX-512, 8 with AVX, 4 otherwise (SSE, NEON); the layout the Python side
   packs does not depend on it. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));
/* Packed weights, outputs and the patch buffer are 64-byte aligned (checked by the entry points), so their
   vectors load and store whole: some compilers' tunings split unaligned 256-bit loads, which through a
   stack copy cost several times the arithmetic. */
#define LOAD(p) (*(const vf *)(p))
#define STORE(p, v) (*(vf *)(p) = (v))

typedef struct {
    const float *x, *wt, *bias, *g, *out, *w6;
    float *y, *gin;
    uint8_t *arg;
    const uint8_t *carg;
    int n0, n1, cin, hp, wp, k, cout, ph, pw, relu;
} job_t;

/* The max over the four window positions (the first max in row-major order wins, a NaN wins, as in the
   library's max-pool) of conv + bias, then the ReLU, for the VW channels from cb on; branch-free. */
static inline __attribute__((always_inline)) void pool_store(const job_t *j, size_t o, int cb, vf a0, vf a1,
                                                             vf a2, vf a3) {
    if (j->bias) { const vf bv = *(const vf_u *)(j->bias + cb); a0 += bv; a1 += bv; a2 += bv; a3 += bv; }
    vi d = {0}, s;
    vf m = a0;
    s = (a1 > m) | (a1 != a1); m = (vf)(((vi)a1 & s) | ((vi)m & ~s)); d = (d & ~s) | (s & 1);
    s = (a2 > m) | (a2 != a2); m = (vf)(((vi)a2 & s) | ((vi)m & ~s)); d = (d & ~s) | (s & 2);
    s = (a3 > m) | (a3 != a3); m = (vf)(((vi)a3 & s) | ((vi)m & ~s)); d = (d & ~s) | (s & 3);
    if (j->relu) { s = (m > 0.f) | (m != m); m = (vf)((vi)m & s); }      /* relu(NaN) = NaN */
    STORE(j->y + o + cb, m);
    uint8_t am[VW];
    for (int c = 0; c < VW; c++) am[c] = (uint8_t)d[c];
    memcpy(j->arg + o + cb, am, sizeof am);
}

/* x: (N, cin, hp, wp); wt: (k, k, cin, cout), cout a multiple of 16; y: (N, ph, pw, cout) (channels-last);
   arg: (N, ph, pw, cout), the window position 2*dy + dx of each max. */
static void fwd_range(const job_t *j) {
    const int cin = j->cin, hp = j->hp, wp = j->wp, k = j->k, cout = j->cout, ph = j->ph, pw = j->pw;
    const float *restrict wt = j->wt;
    for (int n = j->n0; n < j->n1; n++) {
        const float *restrict xn = j->x + (size_t)n * cin * hp * wp;
        for (int i = 0; i < ph; i++) for (int jj = 0; jj < pw; jj++) {
            const size_t o = (((size_t)n * ph + i) * pw + jj) * cout;
            int cb = 0;
            for (; cb + 2 * VW <= cout; cb += 2 * VW) {      /* two vectors of channels: 8 independent sums */
                vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                for (int ky = 0; ky < k; ky++) for (int kx = 0; kx < k; kx++) for (int ci = 0; ci < cin; ci++) {
                    const float *r0 = xn + ((size_t)ci * hp + 2 * i + ky) * wp + 2 * jj + kx, *r1 = r0 + wp;
                    const float x0 = r0[0], x1 = r0[1], x2 = r1[0], x3 = r1[1];
                    const float *w0 = wt + ((size_t)(ky * k + kx) * cin + ci) * cout + cb;
                    const vf w = LOAD(w0), u = LOAD(w0 + VW);
                    a0 += x0 * w; a1 += x1 * w; a2 += x2 * w; a3 += x3 * w;
                    b0 += x0 * u; b1 += x1 * u; b2 += x2 * u; b3 += x3 * u;
                }
                pool_store(j, o, cb, a0, a1, a2, a3);
                pool_store(j, o, cb + VW, b0, b1, b2, b3);
            }
            for (; cb < cout; cb += VW) {
                vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int ky = 0; ky < k; ky++) for (int kx = 0; kx < k; kx++) for (int ci = 0; ci < cin; ci++) {
                    const float *r0 = xn + ((size_t)ci * hp + 2 * i + ky) * wp + 2 * jj + kx, *r1 = r0 + wp;
                    const vf w = LOAD(wt + ((size_t)(ky * k + kx) * cin + ci) * cout + cb);
                    a0 += r0[0] * w; a1 += r0[1] * w; a2 += r1[0] * w; a3 += r1[1] * w;
                }
                pool_store(j, o, cb, a0, a1, a2, a3);
            }
        }
    }
}

/* Blocks b0 .. b0+nb-1 (VW floats each) of one pooled output's input-gradient patch: the sum over channels of
   the output's gradient times the channel's kernel placed at the position of its max. w6: (4, cout, stride):
   for window position d = 2*dy + dx, channel c's kernel at (dy, dx) in a (cin, k+1, k+1) patch, zeros
   elsewhere and after. `nb` is a constant at each call site, so the sums stay in registers. */
static inline __attribute__((always_inline)) void patch_blocks(const job_t *j, size_t o, int stride, int b0,
                                                               const int nb, float *pa) {
    vf acc[8];
    for (int b = 0; b < nb; b++) acc[b] = (vf){0};
    for (int c = 0; c < j->cout; c++) {
        float gc = j->g[o + c];
        gc = (j->relu && !(j->out[o + c] > 0.f)) ? 0.f : gc;         /* the ReLU's gradient, as the library's */
        const float *w = j->w6 + ((size_t)j->carg[o + c] * j->cout + c) * stride + (size_t)b0 * VW;
        for (int b = 0; b < nb; b++) acc[b] += gc * LOAD(w + VW * b);
    }
    for (int b = 0; b < nb; b++) STORE(pa + (size_t)(b0 + b) * VW, acc[b]);
}

/* g: (N, ph, pw, cout), the gradient of y; y and carg from the forward; gin: (N, cin, hp, wp), overwritten.
   Each pooled output adds one (cin, k+1, k+1) patch to the input gradient. */
static void bwd_range(const job_t *j) {
    const int cin = j->cin, hp = j->hp, wp = j->wp, ph = j->ph, pw = j->pw, k1 = j->k + 1;
    const int stride = (cin * k1 * k1 + 15) / 16 * 16, nblk = stride / VW;       /* stride <= 128: checked */
    float pa[128] __attribute__((aligned(64)));
    for (int n = j->n0; n < j->n1; n++) {
        float *restrict gn = j->gin + (size_t)n * cin * hp * wp;
        memset(gn, 0, sizeof(float) * (size_t)cin * hp * wp);
        for (int i = 0; i < ph; i++) for (int jj = 0; jj < pw; jj++) {
            const size_t o = (((size_t)n * ph + i) * pw + jj) * j->cout;
            for (int b0 = 0; b0 < nblk; b0 += 8) {
                switch (nblk - b0 < 8 ? nblk - b0 : 8) {
                case 1: patch_blocks(j, o, stride, b0, 1, pa); break;
                case 2: patch_blocks(j, o, stride, b0, 2, pa); break;
                case 3: patch_blocks(j, o, stride, b0, 3, pa); break;
                case 4: patch_blocks(j, o, stride, b0, 4, pa); break;
                case 5: patch_blocks(j, o, stride, b0, 5, pa); break;
                case 6: patch_blocks(j, o, stride, b0, 6, pa); break;
                case 7: patch_blocks(j, o, stride, b0, 7, pa); break;
                default: patch_blocks(j, o, stride, b0, 8, pa); break;
                }
            }
            for (int ci = 0; ci < cin; ci++) for (int yy = 0; yy < k1; yy++) {
                float *row = gn + ((size_t)ci * hp + 2 * i + yy) * wp + 2 * jj;
                const float *pr = pa + (ci * k1 + yy) * k1;
                for (int xx = 0; xx < k1; xx++) row[xx] += pr[xx];
            }
        }
    }
}

/* Images split evenly over `threads` (each image is one thread's work, in a fixed order: the result does not
   depend on the thread count or on which other images share the call). */
static void run(void (*fn)(const job_t *), job_t base, int n, int threads) {
    if (threads > n) threads = n;
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        job_t jb = base;
        jb.n0 = (int)((long)n * t / threads);
        jb.n1 = (int)((long)n * (t + 1) / threads);
        fn(&jb);
    }
}

static job_t job(int n, int cin, int hp, int wp, int k, int cout, int relu) {
    job_t b;
    memset(&b, 0, sizeof b);
    b.cin = cin; b.hp = hp; b.wp = wp; b.k = k; b.cout = cout; b.relu = relu;
    b.ph = (hp - k + 1) / 2; b.pw = (wp - k + 1) / 2;
    (void)n;
    return b;
}

int nnl_conv_pool_version(void) { return 1; }

int nnl_conv_pool_vector_width(void) { return VW; }

#define MISALIGNED(p) (((uintptr_t)(p)) % 64 != 0)

int nnl_conv_pool_fwd(const float *x, const float *wt, const float *bias, float *y, uint8_t *arg,
                      int n, int cin, int hp, int wp, int k, int cout, int relu, int threads) {
    if (n < 0 || cin < 1 || k < 1 || cout < 16 || cout % 16 || hp < k + 1 || wp < k + 1) return 1;
    if (MISALIGNED(wt) || MISALIGNED(y)) return 2;
    job_t b = job(n, cin, hp, wp, k, cout, relu);
    b.x = x; b.wt = wt; b.bias = bias; b.y = y; b.arg = arg;
    run(fwd_range, b, n, threads);
    return 0;
}

int nnl_conv_pool_bwd(const float *g, const float *y, const uint8_t *arg, const float *w6, float *gin,
                      int n, int cin, int hp, int wp, int k, int cout, int relu, int threads) {
    if (n < 0 || cin < 1 || k < 1 || cout < 16 || cout % 16 || hp < k + 1 || wp < k + 1
        || cin * (k + 1) * (k + 1) > 8 * 16) return 1;
    if (MISALIGNED(w6)) return 2;
    job_t b = job(n, cin, hp, wp, k, cout, relu);
    b.g = g; b.out = y; b.carg = arg; b.w6 = w6; b.gin = gin;
    run(bwd_range, b, n, threads);
    return 0;
}
