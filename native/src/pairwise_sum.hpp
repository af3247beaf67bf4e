// numpy's pairwise summation (np.add.reduce over a contiguous array): blocks of 8 accumulators up
// to 128 values, halves above, so that sums (and means) round as numpy's do.
#pragma once

#include <cstddef>

namespace omniforge {

template <class T>
T pairwise_sum(const T* a, size_t n) {
    if (n < 8) {
        T r = T(0);
        for (size_t i = 0; i < n; ++i) r += a[i];
        return r;
    }
    if (n <= 128) {
        T r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        size_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        T res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    size_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

}  // namespace omniforge
