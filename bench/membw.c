/* Peak memory read bandwidth, STREAM style: each thread XOR-reduces its part of a buffer far larger than the
 * caches, reading it as several interleaved streams (one sequential stream per core leaves bandwidth unused on
 * many CPUs); the best pass over 1, 2, 4, 8 and 16 streams is printed in GB/s. Built and run by
 * bench/generation.py, whose decoding roofline is this bandwidth over the bytes a decode step must read. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

/* The widest integer vector the build targets: AVX-512 where the CPU has it, else AVX2. */
#ifdef __AVX512F__
typedef __m512i vec;
#define ZERO() _mm512_setzero_si512()
#define XOR(a, b) _mm512_xor_si512(a, b)
#define LOAD(p) _mm512_load_si512(p)
#define SET(x) _mm512_set1_epi64(x)
static long long reduce(vec v) { return _mm512_reduce_add_epi64(v); }
#else
typedef __m256i vec;
#define ZERO() _mm256_setzero_si256()
#define XOR(a, b) _mm256_xor_si256(a, b)
#define LOAD(p) _mm256_load_si256(p)
#define SET(x) _mm256_set1_epi64x(x)
static long long reduce(vec v) {
    long long lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, v);
    return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}
#endif

static double best_pass(const vec *buffer, size_t n, int streams, long long *sink) {
    double best = 0;
    for (int pass = 0; pass < 6; pass++) {
        double start = omp_get_wtime();
        long long local = 0;
        #pragma omp parallel reduction(^ : local)
        {
            size_t per = n / omp_get_num_threads(), first = omp_get_thread_num() * per, len = per / streams;
            vec acc[16];
            for (int s = 0; s < 16; s++) acc[s] = ZERO();
            for (size_t i = 0; i < len; i++)
                for (int s = 0; s < streams; s++)
                    acc[s] = XOR(acc[s], LOAD(&buffer[first + s * len + i]));
            for (int s = 1; s < streams; s++) acc[0] = XOR(acc[0], acc[s]);
            local ^= reduce(acc[0]);
        }
        double rate = n * (double)sizeof(vec) / (omp_get_wtime() - start);
        *sink ^= local;
        if (rate > best) best = rate;
    }
    return best;
}

int main(int argc, char **argv) {
    size_t bytes = (size_t)((argc > 1 ? atoi(argv[1]) : 2048) + 1) / 2 << 21, n = bytes / sizeof(vec);
    /* On 2 MB pages, as starcoder keeps its weights: from 4 KB pages this machine read slower (a page walk and a
     * prefetcher restart every 4 KB), which would understate the bandwidth a decode step can reach. */
    vec *buffer = aligned_alloc(2 << 20, bytes);
    if (!buffer) return 1;
    madvise(buffer, bytes, MADV_HUGEPAGE);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) buffer[i] = SET((long long)i);
    double best = 0;
    long long sink = 0;
    for (int streams = 1; streams <= 16; streams *= 2) {
        double rate = best_pass(buffer, n, streams, &sink);
        if (rate > best) best = rate;
    }
    printf("%.3f %d %lld\n", best / 1e9, omp_get_max_threads(), sink & 1);
    free(buffer);
    return 0;
}
