/* A network's first stage fused for a CPU: conv (few input channels, stride 1, on an already zero-padded
   input) -> 2x2 max-pool (stride 2, floor) -> optional ReLU, forward and input gradient, in fp32.

   Built at first use by nnlaunder/native.py (cc -O3 -march=native -fopenmp) and called through ctypes on
   contiguous tensors; the Python side checks every shape before a call. Loaded after torch, the OpenMP
   runtime is torch's own (the same soname), so its threads are the library's.

   Why: the library runs this stage as a dense conv, a pool that writes int64 indices, a zero-filled
   (N, C, 2H', 2W') pool gradient and a conv input gradient, all memory-bound at Neural Cleanse's batch
   sizes. Here each pooled output is computed from its four window positions at once, and its gradient
   goes to one (cin, k+1, k+1) patch of the input: a quarter of the dense gradient's arithmetic. */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int vi16 __attribute__((vector_size(64), aligned(4)));

typedef struct {
    const float *x, *wt, *bias, *g, *out, *w6;
    float *y, *gin;
    uint8_t *arg;
    const uint8_t *carg;
    int n0, n1, cin, hp, wp, k, cout, ph, pw, relu;
} job_t;

/* The max over the four window positions (the first max in row-major order wins, a NaN wins, as in the
   library's max-pool) of conv + bias, then the ReLU, for the 16 channels from cb on; branch-free. */
static inline void pool_store(const job_t *j, size_t o, int cb, v16 a0, v16 a1, v16 a2, v16 a3) {
    if (j->bias) { v16 bv; memcpy(&bv, j->bias + cb, sizeof bv); a0 += bv; a1 += bv; a2 += bv; a3 += bv; }
    vi16 d = {0}, s;
    v16 m = a0;
    s = (a1 > m) | (a1 != a1); m = (v16)(((vi16)a1 & s) | ((vi16)m & ~s)); d = (d & ~s) | (s & 1);
    s = (a2 > m) | (a2 != a2); m = (v16)(((vi16)a2 & s) | ((vi16)m & ~s)); d = (d & ~s) | (s & 2);
    s = (a3 > m) | (a3 != a3); m = (v16)(((vi16)a3 & s) | ((vi16)m & ~s)); d = (d & ~s) | (s & 3);
    if (j->relu) { s = (m > 0.f) | (m != m); m = (v16)((vi16)m & s); }      /* relu(NaN) = NaN */
    memcpy(j->y + o + cb, &m, sizeof m);
    uint8_t am[16];
    for (int c = 0; c < 16; c++) am[c] = (uint8_t)d[c];
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
            for (; cb + 32 <= cout; cb += 32) {      /* two blocks of 16 channels: 8 independent sums */
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                for (int ky = 0; ky < k; ky++) for (int kx = 0; kx < k; kx++) for (int ci = 0; ci < cin; ci++) {
                    const float *r0 = xn + ((size_t)ci * hp + 2 * i + ky) * wp + 2 * jj + kx, *r1 = r0 + wp;
                    const float x0 = r0[0], x1 = r0[1], x2 = r1[0], x3 = r1[1];
                    const float *w0 = wt + ((size_t)(ky * k + kx) * cin + ci) * cout + cb;
                    v16 w, u;
                    memcpy(&w, w0, sizeof w); memcpy(&u, w0 + 16, sizeof u);
                    a0 += x0 * w; a1 += x1 * w; a2 += x2 * w; a3 += x3 * w;
                    b0 += x0 * u; b1 += x1 * u; b2 += x2 * u; b3 += x3 * u;
                }
                pool_store(j, o, cb, a0, a1, a2, a3);
                pool_store(j, o, cb + 16, b0, b1, b2, b3);
            }
            for (; cb < cout; cb += 16) {
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int ky = 0; ky < k; ky++) for (int kx = 0; kx < k; kx++) for (int ci = 0; ci < cin; ci++) {
                    const float *r0 = xn + ((size_t)ci * hp + 2 * i + ky) * wp + 2 * jj + kx, *r1 = r0 + wp;
                    v16 w;
                    memcpy(&w, wt + ((size_t)(ky * k + kx) * cin + ci) * cout + cb, sizeof w);
                    a0 += r0[0] * w; a1 += r0[1] * w; a2 += r1[0] * w; a3 += r1[1] * w;
                }
                pool_store(j, o, cb, a0, a1, a2, a3);
            }
        }
    }
}

/* One image's input gradient. g: (N, ph, pw, cout), the gradient of y; y and carg from the forward;
   w6: (4, cout, 16 * nb): for window position d = 2*dy + dx, channel c's kernel placed at (dy, dx) in a
   (cin, k+1, k+1) patch, zeros elsewhere and after; gin: (N, cin, hp, wp), overwritten. Each pooled output
   adds one patch: the sum over channels of gradient x kernel at the max's position. `nb` is a constant
   at each call site, so the patch's sums stay in registers. */
static inline __attribute__((always_inline)) void bwd_image(const job_t *j, int n, const int nb) {
    const int cin = j->cin, hp = j->hp, wp = j->wp, cout = j->cout, ph = j->ph, pw = j->pw, k1 = j->k + 1;
    const float *restrict w6 = j->w6;
    float *restrict gn = j->gin + (size_t)n * cin * hp * wp;
    memset(gn, 0, sizeof(float) * (size_t)cin * hp * wp);
    for (int i = 0; i < ph; i++) for (int jj = 0; jj < pw; jj++) {
        const size_t o = (((size_t)n * ph + i) * pw + jj) * cout;
        v16 acc[8];
        for (int b = 0; b < nb; b++) acc[b] = (v16){0};
        for (int c = 0; c < cout; c++) {
            float gc = j->g[o + c];
            gc = (j->relu && !(j->out[o + c] > 0.f)) ? 0.f : gc;     /* the ReLU's gradient, as the library's */
            const float *w = w6 + ((size_t)j->carg[o + c] * cout + c) * nb * 16;
            for (int b = 0; b < nb; b++) { v16 wv; memcpy(&wv, w + 16 * b, sizeof wv); acc[b] += gc * wv; }
        }
        float pa[8 * 16];
        memcpy(pa, acc, sizeof(v16) * nb);
        for (int ci = 0; ci < cin; ci++) for (int yy = 0; yy < k1; yy++) {
            float *row = gn + ((size_t)ci * hp + 2 * i + yy) * wp + 2 * jj;
            const float *pr = pa + (ci * k1 + yy) * k1;
            for (int xx = 0; xx < k1; xx++) row[xx] += pr[xx];
        }
    }
}

static void bwd_range(const job_t *j) {
    const int nb = (j->cin * (j->k + 1) * (j->k + 1) + 15) / 16;      /* 1..8, checked by the caller */
    for (int n = j->n0; n < j->n1; n++) {
        switch (nb) {
        case 1: bwd_image(j, n, 1); break;
        case 2: bwd_image(j, n, 2); break;
        case 3: bwd_image(j, n, 3); break;
        case 4: bwd_image(j, n, 4); break;
        case 5: bwd_image(j, n, 5); break;
        case 6: bwd_image(j, n, 6); break;
        case 7: bwd_image(j, n, 7); break;
        default: bwd_image(j, n, 8); break;
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

int nnl_conv_pool_fwd(const float *x, const float *wt, const float *bias, float *y, uint8_t *arg,
                      int n, int cin, int hp, int wp, int k, int cout, int relu, int threads) {
    if (n < 0 || cin < 1 || k < 1 || cout < 16 || cout % 16 || hp < k + 1 || wp < k + 1) return 1;
    job_t b = job(n, cin, hp, wp, k, cout, relu);
    b.x = x; b.wt = wt; b.bias = bias; b.y = y; b.arg = arg;
    run(fwd_range, b, n, threads);
    return 0;
}

int nnl_conv_pool_bwd(const float *g, const float *y, const uint8_t *arg, const float *w6, float *gin,
                      int n, int cin, int hp, int wp, int k, int cout, int relu, int threads) {
    if (n < 0 || cin < 1 || k < 1 || cout < 16 || cout % 16 || hp < k + 1 || wp < k + 1
        || cin * (k + 1) * (k + 1) > 8 * 16) return 1;
    job_t b = job(n, cin, hp, wp, k, cout, relu);
    b.g = g; b.out = y; b.carg = arg; b.w6 = w6; b.gin = gin;
    run(bwd_range, b, n, threads);
    return 0;
}
