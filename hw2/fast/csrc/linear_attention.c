/* unet.LinearAttention in one pass per image, for sampling on a CPU (hw2/fast/kernel.py builds it),
   with the LayerNorm before it (PreNorm's) and its own LayerNorm after it.

   The function, per image, with x_n the C channels of pixel n (n < N) and j < HID = HEADS * D
   the hidden features (head h = j / D):
       the norm before, per pixel:              x_n <- LN(x_n) g_in    (skipped when g_in is NULL)
       k = W_k x, softmax over the pixels:     kx[j] = sum_n softmax_n(k[j]) x_n          (HID, C)
       context, output conv and q's scale:      M[j] = W_out[:, h] (W_v[h] kx[h]^T)[:, d]^T
       q = W_q x, softmax over each head's D:   y_n = bias + sum_j softmax_d(q_n[h])_d M[j]
       the norm after, per pixel:               out_n = LN(y_n) g_out
   with LN(z) = (z - mean(z)) / sqrt(var(z) + eps) over the C channels (biased variance), as
   unet.LayerNorm. The same reassociation as hw2/fast/layers.py FoldedLinearAttention, but q and k live only in
   blocks of L pixels that stay in the caches, where torch writes and rereads them whole (16 MiB
   each for 32 images of 32 x 32 px). The caller folds log2 e into W_q and W_k, so the
   exponentials are 2^z, and dim_head^-0.5 / N into W_out. Every softmax subtracts its maximum
   first, as torch's does.

   Vectors hold L pixels (q and k blocks are feature-major: one vector per feature) or L channels
   (kx, x); GCC's and Clang's vector extensions map them to whatever the CPU has (-march=native).
   Images go to the threads; each thread keeps its own scratch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define L 16 /* floats per vector */
#define HEADS 4
#define D 32
#define HID (HEADS * D)

typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

static inline vf splat(float a) { return (vf){0} + a; }

static inline vf blend(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

static inline vf vmax(vf a, vf b) { return blend(a > b, a, b); }

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* 2^z for z <= 0, to about 1e-7 relative: 2^n 2^f with n = round(z), f in [-1/2, 1/2] and 2^f
   = e^(f ln 2) by its Taylor series to degree 7. Below -126 it flushes to 2^-126 ~ 1e-38 (0 in
   any sum that matters); a NaN stays NaN. So a NaN anywhere in x makes its image's output NaN,
   as in torch, whatever the maxima saw. */
static inline vf exp2_nonpositive(vf z) {
    z = blend(z < -126.0f, splat(-126.0f), z);
    vi n = __builtin_convertvector(z - 0.5f, vi); /* conversion truncates toward 0: round(z) for z <= 0 */
    vf f = (z - __builtin_convertvector(n, vf)) * 0.69314718055994531f;
    vf p = splat(1.0f / 5040);
    p = p * f + 1.0f / 720;
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return p * (vf)((n + 127) << 23); /* 2^n from its exponent bits */
}

static inline float hmax(vf a) {
    float m = a[0];
    for (int i = 1; i < L; i++) m = a[i] > m ? a[i] : m;
    return m;
}

static inline float hsum(vf a) {
    float s = 0.0f;
    for (int i = 0; i < L; i++) s += a[i];
    return s;
}

static inline vf rsqrt(vf a) {
    vf r;
    for (int i = 0; i < L; i++) r[i] = 1.0f / sqrtf(a[i]);
    return r;
}

/* z[c] <- LN(z)[c] g[c] for the L pixels of z (C vectors, channel-major): the norm of every pixel at once */
static inline __attribute__((always_inline)) void layer_norm(vf *restrict z, const float *restrict g, float eps,
                                                             const int C) {
    vf mean = splat(0.0f), var = splat(0.0f);
    for (int c = 0; c < C; c++) mean += z[c];
    mean /= (float)C;
    for (int c = 0; c < C; c++) var += (z[c] - mean) * (z[c] - mean);
    vf inv = rsqrt(var / (float)C + eps);
    for (int c = 0; c < C; c++) z[c] = (z[c] - mean) * inv * g[c];
}

/* out[j] = sum_c w[j][c] xt[c] for the L pixels of xt (C vectors, channel-major); w is (HID, C) */
static inline __attribute__((always_inline)) void project(const float *restrict w, const vf *restrict xt,
                                                          vf *restrict out, const int C) {
    for (int j0 = 0; j0 < HID; j0 += 16) {
        vf acc[16];
        for (int i = 0; i < 16; i++) acc[i] = splat(0.0f);
        for (int c = 0; c < C; c++)
            for (int i = 0; i < 16; i++) acc[i] += w[(j0 + i) * C + c] * xt[c];
        for (int i = 0; i < 16; i++) out[j0 + i] = acc[i];
    }
}

/* One image: x (N, C) pixel-major -> out (N, C). Scratch: xt (N/L * C vectors), kt (N/L * HID
   vectors), v (2 HID + C vectors), f (HID + 2 HID C + D + HID L + N C floats). */
static inline __attribute__((always_inline)) void image(const float *restrict x_in, const float *restrict g_in,
                                                        const float *restrict w_q, const float *restrict w_k,
                                                        const float *restrict w_v, const float *restrict w_out,
                                                        const float *restrict bias, const float *restrict g_out,
                                                        float eps, float *restrict out, const int N, const int C,
                                                        vf *restrict xt, vf *restrict kt, vf *restrict v,
                                                        float *restrict f) {
    const int blocks = N / L;
    vf *kmax = v, *ksum = kmax + HID, *ot = ksum + HID;
    float *m = f, *kx = m + HID, *M = kx + HID * C, *context = M + HID * C, *e = context + D;
    float *x = e + HID * L; /* the normed input, pixel-major (N, C) */

    /* x in blocks of L pixels, channel-major, xt[b * C + c][p] = x[b L + p][c], normed there; and
       back to pixel-major, for kx's sums */
    for (int b = 0; b < blocks; b++) {
        vf *xb = xt + b * C;
        for (int c = 0; c < C; c++)
            for (int p = 0; p < L; p++) xb[c][p] = x_in[(size_t)(b * L + p) * C + c];
        if (g_in) layer_norm(xb, g_in, eps, C);
        for (int p = 0; p < L; p++)
            for (int c = 0; c < C; c++) x[(size_t)(b * L + p) * C + c] = xb[c][p];
    }

    /* k = W_k x for every pixel (kept: N HID floats, in the L2 cache at 32 x 32 px), its maximum per feature */
    for (int j = 0; j < HID; j++) kmax[j] = splat(-INFINITY);
    for (int b = 0; b < blocks; b++) {
        vf *t = kt + (size_t)b * HID;
        project(w_k, xt + b * C, t, C);
        for (int j = 0; j < HID; j++) kmax[j] = vmax(kmax[j], t[j]);
    }
    for (int j = 0; j < HID; j++) m[j] = hmax(kmax[j]);

    /* kx[j] = sum_n 2^(k[j][n] - m[j]) x_n / sum_n 2^(k[j][n] - m[j]) */
    for (int j = 0; j < HID; j++) ksum[j] = splat(0.0f);
    memset(kx, 0, sizeof(float) * HID * C);
    for (int b = 0; b < blocks; b++) {
        const vf *t = kt + (size_t)b * HID;
        for (int j = 0; j < HID; j++) {
            vf ej = exp2_nonpositive(t[j] - m[j]);
            ksum[j] += ej;
            store(e + j * L, ej);
        }
        const float *xb = x + (size_t)b * L * C;
        for (int j0 = 0; j0 < HID; j0 += 8)
            for (int c0 = 0; c0 < C; c0 += L) {
                vf acc[8];
                for (int i = 0; i < 8; i++) acc[i] = load(kx + (j0 + i) * C + c0);
                for (int p = 0; p < L; p++) {
                    vf xp = load(xb + p * C + c0);
                    for (int i = 0; i < 8; i++) acc[i] += e[(j0 + i) * L + p] * xp;
                }
                for (int i = 0; i < 8; i++) store(kx + (j0 + i) * C + c0, acc[i]);
            }
    }
    for (int j = 0; j < HID; j++) {
        float inv = 1.0f / hsum(ksum[j]);
        for (int c = 0; c < C; c++) kx[j * C + c] *= inv;
    }

    /* context[d][g] = kx[hD + d] . W_v[hD + g] per head; M[hD + d][o] = sum_g W_out[o][hD + g] context[d][g] */
    for (int h = 0; h < HEADS; h++)
        for (int d = 0; d < D; d++) {
            const float *kd = kx + (h * D + d) * C;
            for (int g = 0; g < D; g++) {
                const float *vg = w_v + (h * D + g) * C;
                float acc = 0.0f;
                for (int c = 0; c < C; c++) acc += kd[c] * vg[c];
                context[g] = acc;
            }
            for (int o = 0; o < C; o++) {
                const float *wo = w_out + o * HID + h * D;
                float acc = 0.0f;
                for (int g = 0; g < D; g++) acc += wo[g] * context[g];
                M[(h * D + d) * C + o] = acc;
            }
        }

    /* per block of L pixels: q = W_q x, softmax over each head's D features, out = bias + sum_j q[j] M[j] */
    vf *q = kt; /* k is spent: its first block's room */
    for (int b = 0; b < blocks; b++) {
        project(w_q, xt + b * C, q, C);
        for (int h = 0; h < HEADS; h++) {
            vf *qh = q + h * D;
            vf mx = qh[0];
            for (int d = 1; d < D; d++) mx = vmax(mx, qh[d]);
            vf sum = splat(0.0f);
            for (int d = 0; d < D; d++) {
                qh[d] = exp2_nonpositive(qh[d] - mx);
                sum += qh[d];
            }
            vf inv = 1.0f / sum;
            for (int d = 0; d < D; d++) qh[d] *= inv;
        }
        for (int o0 = 0; o0 < C; o0 += 16) {
            vf acc[16];
            for (int i = 0; i < 16; i++) acc[i] = splat(bias[o0 + i]);
            for (int j = 0; j < HID; j++)
                for (int i = 0; i < 16; i++) acc[i] += M[j * C + o0 + i] * q[j];
            for (int i = 0; i < 16; i++) ot[o0 + i] = acc[i];
        }
        layer_norm(ot, g_out, eps, C);
        float *ob = out + (size_t)b * L * C;
        for (int p = 0; p < L; p++)
            for (int o = 0; o < C; o++) ob[p * C + o] = ot[o][p];
    }
}

#define IMAGE(CC)                                                                                 \
    case CC:                                                                                      \
        image(x + (size_t)b * N * CC, g_in, w_q, w_k, w_v, w_out, bias, g_out, eps, out + (size_t)b * N * CC, N, \
              CC, xt, kt, v, f);                                                                  \
        break;

/* x (B, N, C) -> out (B, N, C), both float32 and pixel-major; g_in (C) or NULL, w_q, w_k, w_v
   (HID, C), w_out (C, HID), bias and g_out (C); eps for both norms. Returns 0, or -1 for a shape
   it does not take (N not a multiple of L, C not 16, 32, 64 or 128), or -2 when its scratch could
   not be allocated; out is then unspecified. */
int hw2_linear_attention(const float *x, const float *g_in, const float *w_q, const float *w_k, const float *w_v,
                         const float *w_out, const float *bias, const float *g_out, float eps, float *out, int B,
                         int N, int C, int threads) {
    if (N <= 0 || N % L || (C != 16 && C != 32 && C != 64 && C != 128)) return -1;
    int failed = 0;
    size_t nv = (size_t)N / L * (C + HID) + 2 * HID + C, nf = (size_t)HID + 2 * HID * C + D + HID * L + (size_t)N * C;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        vf *xt = aligned_alloc(64, nv * sizeof(vf));
        float *f = aligned_alloc(64, (nf * sizeof(float) + 63) / 64 * 64);
        if (!xt || !f) {
#pragma omp atomic write
            failed = 1;
        }
        vf *kt = xt ? xt + (size_t)N / L * C : NULL, *v = kt ? kt + (size_t)N / L * HID : NULL;
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            if (!xt || !f) continue;
            switch (C) { IMAGE(16) IMAGE(32) IMAGE(64) IMAGE(128) }
        }
        free(xt);
        free(f);
    }
    return failed ? -2 : 0;
}

/* out[i] = 2^z[i] for z[i] <= 0, by the kernel's own exponential (n a multiple of L): for the tests */
void hw2_exp2(const float *z, float *out, int n) {
    for (int i = 0; i + L <= n; i += L) store(out + i, exp2_nonpositive(load(z + i)));
}
