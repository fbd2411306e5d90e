/* jointcomp C runtime: the kernels of a compressed network, dependency-free C99.
 * Weights stay packed in flash and are decoded one kept weight at a time as the
 * kernels multiply: no layer is ever unpacked into RAM. A model's source holds the
 * sections (marked "== name ==") that its layers use. */
#include <stdint.h>
#include <stddef.h>

/* == weights == */
/* One layer's weights: packed (codebook + bit-packed codes + positions) or dense floats. */
typedef struct {
    const float *dense;       /* every weight as float32; NULL when packed */
    const float *codebook;    /* 2^bits centres */
    const uint8_t *codes;     /* codebook index of each kept weight, bit-packed LSB first */
    const uint8_t *positions; /* kept weights: a bitmap (LSB first), or LEB128 gaps between them */
    int32_t numel, nnz;
    int32_t bits, gaps;
    int32_t next, kept;       /* iteration: first flat index not yet visited, kept weights seen */
} jc_weights;

static jc_weights jc_packed(const float *codebook, const uint8_t *codes, const uint8_t *positions,
                            int32_t numel, int32_t nnz, int32_t bits, int32_t gaps)
{
    jc_weights w;
    w.dense = NULL; w.codebook = codebook; w.codes = codes; w.positions = positions;
    w.numel = numel; w.nnz = nnz; w.bits = bits; w.gaps = gaps; w.next = 0; w.kept = 0;
    return w;
}

/* == dense == */
static jc_weights jc_dense(const float *dense, int32_t numel)
{
    jc_weights w = jc_packed(NULL, NULL, NULL, numel, numel, 0, 0);
    w.dense = dense;
    return w;
}

/* == next == */
/* The next kept weight in flat (row-major) order: its index and value; 0 past the last. */
static int jc_next(jc_weights *w, int32_t *index, float *value)
{
    uint32_t bit, pair;
    if (w->dense != NULL) {
        if (w->next >= w->numel) return 0;
        *index = w->next;
        *value = w->dense[w->next++];
        return 1;
    }
    if (w->kept >= w->nnz) return 0;
    if (w->gaps) {
        uint32_t gap = 0, shift = 0, byte;
        do {
            byte = *w->positions++;
            gap |= (byte & 0x7Fu) << shift;
            shift += 7;
        } while (byte & 0x80u);
        w->next += (int32_t)gap;
    } else {
        while (!((w->positions[w->next >> 3] >> (w->next & 7)) & 1u)) w->next++;
    }
    *index = w->next++;
    bit = (uint32_t)w->kept * (uint32_t)w->bits;
    pair = (uint32_t)w->codes[bit >> 3] | ((uint32_t)w->codes[(bit >> 3) + 1] << 8);
    *value = w->codebook[(pair >> (bit & 7u)) & ((1u << w->bits) - 1u)];
    w->kept++;
    return 1;
}

/* == affine == */
/* y[c][k] = y[c][k] * scale[c] + shift[c], either may be NULL (1 and 0). */
static void jc_affine(const float *x, float *y, int32_t channels, int32_t size, const float *scale, const float *shift)
{
    int32_t c, k;
    for (c = 0; c < channels; c++)
        for (k = 0; k < size; k++) {
            float v = x[c * size + k];
            if (scale != NULL) v *= scale[c];
            if (shift != NULL) v += shift[c];
            y[c * size + k] = v;
        }
}

/* == linear == */
/* y = x W^T over `rows` rows of `in` values, then the per-output epilogue. */
static void jc_linear(jc_weights w, const float *x, float *y, int32_t rows, int32_t in, int32_t out,
                      const float *scale, const float *shift)
{
    int32_t r, i, index;
    float v;
    for (r = 0; r < rows; r++) {
        jc_weights it = w;
        for (i = 0; i < out; i++) y[r * out + i] = 0.0f;
        while (jc_next(&it, &index, &v)) y[r * out + index / in] += v * x[r * in + index % in];
        jc_affine(y + r * out, y + r * out, out, 1, scale, shift);
    }
}

/* == conv == */
/* A 2-D convolution with zero padding, scattered one kept weight at a time. */
static void jc_conv2d(jc_weights w, const float *x, float *y, int32_t cin, int32_t ih, int32_t iw,
                      int32_t cout, int32_t oh, int32_t ow, int32_t kh, int32_t kw, int32_t sh, int32_t sw,
                      int32_t ph, int32_t pw, int32_t dh, int32_t dw, int32_t groups,
                      const float *scale, const float *shift)
{
    int32_t cin_g = cin / groups, cout_g = cout / groups, i, index, oy, ox;
    float v;
    for (i = 0; i < cout * oh * ow; i++) y[i] = 0.0f;
    while (jc_next(&w, &index, &v)) {
        int32_t kx = index % kw, ky = (index / kw) % kh, ci = (index / (kw * kh)) % cin_g;
        int32_t co = index / (kw * kh * cin_g), c = (co / cout_g) * cin_g + ci;
        const float *xc = x + c * ih * iw;
        float *yc = y + co * oh * ow;
        for (oy = 0; oy < oh; oy++) {
            int32_t iy = oy * sh - ph + ky * dh;
            if (iy < 0 || iy >= ih) continue;
            for (ox = 0; ox < ow; ox++) {
                int32_t ix = ox * sw - pw + kx * dw;
                if (ix < 0 || ix >= iw) continue;
                yc[oy * ow + ox] += v * xc[iy * iw + ix];
            }
        }
    }
    jc_affine(y, y, cout, oh * ow, scale, shift);
}

/* == pool == */
/* Max or average pooling; padding counts towards the average when count_pad. */
static void jc_pool2d(const float *x, float *y, int32_t channels, int32_t ih, int32_t iw, int32_t oh, int32_t ow,
                      int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph, int32_t pw,
                      int32_t is_max, int32_t count_pad)
{
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < channels; c++)
        for (oy = 0; oy < oh; oy++)
            for (ox = 0; ox < ow; ox++) {
                float acc = 0.0f;
                int32_t seen = 0;
                for (ky = 0; ky < kh; ky++)
                    for (kx = 0; kx < kw; kx++) {
                        int32_t iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
                        float v;
                        if (iy < 0 || iy >= ih || ix < 0 || ix >= iw) continue;
                        v = x[(c * ih + iy) * iw + ix];
                        if (!is_max) acc += v;
                        else if (seen == 0 || v > acc) acc = v;
                        seen++;
                    }
                if (!is_max) acc /= (float)(count_pad ? kh * kw : seen);
                y[(c * oh + oy) * ow + ox] = acc;
            }
}

/* == relu == */
static void jc_relu(const float *x, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* == add == */
static void jc_add(const float *a, const float *b, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* == shortcut == */
/* Option A: every second row and column of each input channel, with pad zero channels before and after. */
static void jc_shortcut(const float *x, float *y, int32_t cin, int32_t ih, int32_t iw, int32_t pad,
                        int32_t cout, int32_t oh, int32_t ow)
{
    int32_t c, r, k;
    for (c = 0; c < cout; c++)
        for (r = 0; r < oh; r++)
            for (k = 0; k < ow; k++)
                y[(c * oh + r) * ow + k] = (c < pad || c >= pad + cin) ? 0.0f : x[((c - pad) * ih + 2 * r) * iw + 2 * k];
}

/* == copy == */
static void jc_copy(const float *x, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = x[i];
}

/* == argmax == */
static int jc_argmax(const float *x, int32_t n)
{
    int32_t i, best = 0;
    for (i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return (int)best;
}
