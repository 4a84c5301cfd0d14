// GLM-OCR image patchify, host side, no CUDA.
//
// Input: one resized RGB image, uint8, HWC, C-contiguous. Output: [N, C*T*P*P] with
//   N = (H/P) * (W/P) rows in merge-block-major order (bh, bw, mh, mw) and each row in
//   (c, t, py, px) order, the temporal copies being identical (a single image is repeated to T).
// Value: a per-(channel, uint8 value) lookup table, so the loop is a gather. Two uses:
// - patchify: float32, x = (pixel - 255*mean_c) / (255*std_c), the table built with the same fp32
//   operations as the numpy twin (glmrt.image_processor.patchify_numpy): bit-identical;
// - patch_pixels: uint8, the identity table and T = 1, for the device to normalize (8x fewer bytes
//   to hold and upload than float32 with T = 2).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace glmrt {

// lut[c*256 + v] = (float(v) - float(255*mean[c])) / float(255*std[c]); the products in double.
void build_normalize_lut(const double* mean, const double* stdev, int64_t channels, float* lut) {
    for (int64_t c = 0; c < channels; ++c) {
        const float shift = static_cast<float>(255.0 * mean[c]);
        const float scale = static_cast<float>(255.0 * stdev[c]);
        for (int v = 0; v < 256; ++v) {
            lut[c * 256 + v] = (static_cast<float>(v) - shift) / scale;
        }
    }
}

namespace {

template <typename Out>
struct Geometry {
    const uint8_t* img;
    int64_t width;     // pixels
    int64_t channels;
    const Out* lut;    // [channels, 256]
    int64_t patch;     // P
    int64_t temporal;  // T
    int64_t merge;     // M
    int64_t blocks_w;  // (W / P) / M
    Out* out;
};

// Writes the rows of merge-block rows [bh_begin, bh_end).
template <typename Out>
void patchify_block_rows(const Geometry<Out>& g, int64_t bh_begin, int64_t bh_end) {
    const int64_t P = g.patch, C = g.channels, M = g.merge, T = g.temporal;
    const int64_t pp = P * P;
    const int64_t row_len = C * T * pp;
    const int64_t row_stride_px = g.width * C;  // bytes per image row
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
        for (int64_t bw = 0; bw < g.blocks_w; ++bw) {
            for (int64_t mh = 0; mh < M; ++mh) {
                for (int64_t mw = 0; mw < M; ++mw) {
                    const int64_t r = ((bh * g.blocks_w + bw) * M + mh) * M + mw;
                    Out* row = g.out + r * row_len;
                    const int64_t y0 = (bh * M + mh) * P;
                    const int64_t x0 = (bw * M + mw) * P;
                    const uint8_t* base = g.img + y0 * row_stride_px + x0 * C;
                    if (C == 3) {
                        Out* d0 = row;
                        Out* d1 = row + T * pp;
                        Out* d2 = row + 2 * T * pp;
                        const Out* l0 = g.lut;
                        const Out* l1 = g.lut + 256;
                        const Out* l2 = g.lut + 512;
                        for (int64_t py = 0; py < P; ++py) {
                            const uint8_t* src = base + py * row_stride_px;
                            const int64_t o = py * P;
                            for (int64_t px = 0; px < P; ++px) {
                                d0[o + px] = l0[src[3 * px + 0]];
                                d1[o + px] = l1[src[3 * px + 1]];
                                d2[o + px] = l2[src[3 * px + 2]];
                            }
                        }
                    } else {
                        for (int64_t py = 0; py < P; ++py) {
                            const uint8_t* src = base + py * row_stride_px;
                            for (int64_t px = 0; px < P; ++px) {
                                for (int64_t c = 0; c < C; ++c) {
                                    row[c * T * pp + py * P + px] = g.lut[c * 256 + src[px * C + c]];
                                }
                            }
                        }
                    }
                    // Temporal padding: frames 1..T-1 repeat frame 0.
                    for (int64_t c = 0; c < C; ++c) {
                        Out* first = row + c * T * pp;
                        for (int64_t t = 1; t < T; ++t) {
                            std::memcpy(first + t * pp, first, static_cast<size_t>(pp) * sizeof(Out));
                        }
                    }
                }
            }
        }
    }
}

template <typename Out>
void patchify_with(const uint8_t* img, int64_t height, int64_t width, int64_t channels, const Out* lut,
                   int64_t patch, int64_t temporal, int64_t merge, Out* out, int64_t num_threads) {
    Geometry<Out> g{img, width, channels, lut, patch, temporal, merge, (width / patch) / merge, out};
    const int64_t blocks_h = (height / patch) / merge;
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks_h));
    if (workers == 1) {
        patchify_block_rows(g, 0, blocks_h);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(workers - 1));
    const int64_t chunk = (blocks_h + workers - 1) / workers;
    for (int64_t w = 1; w < workers; ++w) {
        const int64_t begin = std::min(blocks_h, w * chunk);
        const int64_t end = std::min(blocks_h, begin + chunk);
        if (begin >= end) continue;
        try {
            pool.emplace_back(patchify_block_rows<Out>, std::cref(g), begin, end);
        } catch (...) {  // no thread available: do this share on the calling thread
            patchify_block_rows(g, begin, end);
        }
    }
    patchify_block_rows(g, 0, std::min(blocks_h, chunk));
    for (auto& th : pool) th.join();
}

}  // namespace

// Shapes must already be validated (H % (P*M) == 0, W % (P*M) == 0, all sizes >= 1).
// num_threads <= 1 runs on the calling thread.
void patchify_u8(const uint8_t* img, int64_t height, int64_t width, int64_t channels, const float* lut,
                 int64_t patch, int64_t temporal, int64_t merge, float* out, int64_t num_threads) {
    patchify_with(img, height, width, channels, lut, patch, temporal, merge, out, num_threads);
}

void patch_pixels_u8(const uint8_t* img, int64_t height, int64_t width, int64_t channels, int64_t patch,
                     int64_t merge, uint8_t* out, int64_t num_threads) {
    std::vector<uint8_t> identity(static_cast<size_t>(channels) * 256);
    for (size_t i = 0; i < identity.size(); ++i) identity[i] = static_cast<uint8_t>(i % 256);
    patchify_with(img, height, width, channels, identity.data(), patch, int64_t{1}, merge, out, num_threads);
}

}  // namespace glmrt
