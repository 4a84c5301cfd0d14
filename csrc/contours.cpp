// Layout polygons, host side: the two slow steps of tracing a PP-DocLayoutV3 box's mask.
//
// C++ twins of glmrt.documents.layout._external_contours_py and _approx_poly_dp_py, which follow
// OpenCV 4.x's findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE) and approxPolyDP(closed) step for
// step; see those for the algorithms. Same results, point for point: distances are compared in
// double in the same order (built with -ffp-contract=off, so no fused multiply-add changes a bit).
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace glmrt {

namespace {

constexpr uint8_t kNew = 2;       // a border pixel that was followed
constexpr uint8_t kRight = 0x82;  // ... with background on its right
constexpr int kChain[8][2] = {{1, 0}, {1, -1}, {0, -1}, {-1, -1}, {-1, 0}, {-1, 1}, {0, 1}, {1, 1}};

// Follows the outer border from flat index `start` of the framed image, marking its pixels;
// appends (x, y) (unframed) of each pixel where the border changes direction to `out`.
void follow_border(std::vector<uint8_t>& img, int64_t start, int64_t stride, std::vector<int32_t>& out) {
    int64_t steps[16];
    for (int i = 0; i < 16; ++i) steps[i] = kChain[i & 7][0] + kChain[i & 7][1] * stride;
    auto emit = [&](int64_t flat) {
        out.push_back(static_cast<int32_t>(flat % stride - 1));
        out.push_back(static_cast<int32_t>(flat / stride - 1));
    };
    int s = 4;
    int64_t second = 0;
    while (true) {  // clockwise from the background pixel on the left to the first foreground one
        s = (s - 1) & 7;
        second = start + steps[s];
        if (img[second] || s == 4) break;
    }
    if (s == 4) {  // an isolated pixel
        img[start] = kRight;
        emit(start);
        return;
    }
    int64_t here = start, nxt = start;
    int prev_s = s ^ 4;
    while (true) {
        const int came = s;
        while (s < 15) {  // counter-clockwise from the previous pixel to the next foreground one
            ++s;
            nxt = here + steps[s];
            if (img[nxt]) break;
        }
        s &= 7;
        if (1 <= s && s <= came) {
            img[here] = kRight;
        } else if (img[here] == 1) {
            img[here] = kNew;
        }
        if (s != prev_s) {
            emit(here);
            prev_s = s;
        }
        if (nxt == start && here == second) return;
        here = nxt;
        s = (s + 4) & 7;
    }
}

}  // namespace

// mask: [height, width] bytes, non-zero = foreground. -> the external contours, last found first,
// each a flat (x0, y0, x1, y1, ...) list of corner points.
std::vector<std::vector<int32_t>> external_contours(const uint8_t* mask, int64_t height, int64_t width) {
    const int64_t stride = width + 2;
    std::vector<uint8_t> img(static_cast<size_t>((height + 2) * stride), 0);
    for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x) img[(y + 1) * stride + x + 1] = mask[y * width + x] != 0;
    std::vector<std::vector<int32_t>> contours;
    for (int64_t y = 1; y <= height; ++y) {
        const int64_t row = y * stride;
        for (int64_t flat = row + 1; flat <= row + width; ++flat) {
            // A 0 -> 1 step whose 1 is unmarked (background is never marked, so the left
            // neighbour is as it was).
            if (img[flat] != 1 || img[flat - 1] != 0) continue;
            int64_t nearest = flat - 1;  // the nearest marked pixel to the left on this row
            while (nearest >= row && img[nearest] != kNew && img[nearest] != kRight) --nearest;
            if (nearest >= row && img[nearest] == kNew) continue;  // inside a hole of a followed border
            contours.emplace_back();
            follow_border(img, flat, stride, contours.back());
        }
    }
    return {contours.rbegin(), contours.rend()};
}

// points: n (x, y) pairs of a closed curve. -> the simplified curve, flat (x, y) pairs.
std::vector<int32_t> approx_poly_dp(const int32_t* points, int64_t n, double epsilon) {
    auto px = [&](int64_t i) { return static_cast<int64_t>(points[2 * i]); };
    auto py = [&](int64_t i) { return static_cast<int64_t>(points[2 * i + 1]); };
    const double eps2 = epsilon * epsilon;
    int64_t pos = 0, far = 0;
    double best = 0.0;
    for (int round = 0; round < 3; ++round) {
        pos = (pos + far) % n;
        const int64_t sx = px(pos), sy = py(pos);
        best = 0.0;
        for (int64_t j = 1; j < n; ++j) {
            const int64_t k = (pos + j) % n;
            const double dx = static_cast<double>(px(k) - sx), dy = static_cast<double>(py(k) - sy);
            if (dx * dx + dy * dy > best) {
                best = dx * dx + dy * dy;
                far = j;
            }
        }
    }
    std::vector<std::pair<int64_t, int64_t>> out;  // (x, y)
    if (best <= eps2) {
        out.emplace_back(px(pos), py(pos));
    } else {
        const int64_t split = (pos + far) % n;
        std::vector<std::pair<int64_t, int64_t>> stack = {{split, pos}, {pos, split}};  // (start, end)
        while (!stack.empty()) {
            const auto [a, b] = stack.back();
            stack.pop_back();
            const int64_t sx = px(a), sy = py(a), ex = px(b), ey = py(b);
            int64_t i = (a + 1) % n;
            if (i == b) {
                out.emplace_back(sx, sy);
                continue;
            }
            const double dx = static_cast<double>(ex - sx), dy = static_cast<double>(ey - sy);
            const double seg2 = dx * dx + dy * dy;
            double far2 = 0.0;
            int64_t cut = a;
            while (i != b) {
                const int64_t qx = px(i), qy = py(i);
                const double projection = static_cast<double>(qx - sx) * dx + static_cast<double>(qy - sy) * dy;
                double d2;
                if (projection < 0) {
                    d2 = static_cast<double>((qx - sx) * (qx - sx) + (qy - sy) * (qy - sy)) * seg2;
                } else if (projection > seg2) {
                    d2 = static_cast<double>((qx - ex) * (qx - ex) + (qy - ey) * (qy - ey)) * seg2;
                } else {
                    const double cross = static_cast<double>(qy - sy) * dx - static_cast<double>(qx - sx) * dy;
                    d2 = cross * cross;
                }
                if (d2 > far2) {
                    far2 = d2;
                    cut = i;
                }
                i = (i + 1) % n;
            }
            if (far2 <= eps2 * seg2) {
                out.emplace_back(sx, sy);
            } else {
                stack.emplace_back(cut, b);
                stack.emplace_back(a, cut);
            }
        }
    }
    // Clean-up, in place: drop a middle point close to the line of its neighbours.
    const int64_t count = static_cast<int64_t>(out.size());
    int64_t kept = count;
    auto start = out[count - 1];
    int64_t write = 0;
    auto mid = out[0];
    int64_t read = 1 % count;
    int64_t i = 0;
    while (i < count && kept > 2) {
        const auto end = out[read];
        read = (read + 1) % count;
        const double dx = static_cast<double>(end.first - start.first), dy = static_cast<double>(end.second - start.second);
        double dist = static_cast<double>(mid.first - start.first) * dy - static_cast<double>(mid.second - start.second) * dx;
        dist = dist < 0 ? -dist : dist;
        const int64_t inner = (mid.first - start.first) * (end.first - mid.first) +
                              (mid.second - start.second) * (end.second - mid.second);
        if (dist * dist <= 0.5 * eps2 * (dx * dx + dy * dy) && dx != 0 && dy != 0 && inner >= 0) {
            --kept;
            out[write] = start = end;
            write = (write + 1) % count;
            mid = out[read];
            read = (read + 1) % count;
            i += 2;
            continue;
        }
        out[write] = start = mid;
        write = (write + 1) % count;
        mid = end;
        i += 1;
    }
    std::vector<int32_t> flat;
    flat.reserve(static_cast<size_t>(2 * kept));
    for (int64_t k = 0; k < kept; ++k) {
        flat.push_back(static_cast<int32_t>(out[k].first));
        flat.push_back(static_cast<int32_t>(out[k].second));
    }
    return flat;
}

}  // namespace glmrt
