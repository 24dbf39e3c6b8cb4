/* Intel AMX set-up shared by the kernels that multiply on tiles (layers/_bf16_tiles_cpu.c,
 * engine/_prefill_attention_cpu.c): asking Linux for the tile state, and the one tile
 * configuration they all use (eight tiles of 16 rows x 64 bytes: a bf16 A or B tile of
 * 16 x 32, or an fp32 C tile of 16 x 16).
 *
 * Linux hands AMX state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM);
 * asking again is harmless, so each module asks when it loads. The configuration is
 * per thread; each unit of work makes sure it is loaded (amx_configure).
 * Header-only; include it where SELFHOST_AMX_TILES is defined (x86-64 Linux, GCC >= 11).
 */
#ifndef SELFHOST_AMX_TILES_H
#define SELFHOST_AMX_TILES_H

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define SELFHOST_AMX_TILES 1
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

enum { AMX_TILE_ROWS = 16, AMX_TILE_K = 32, AMX_TILE_ELEMS = AMX_TILE_ROWS * AMX_TILE_K };

typedef struct __attribute__((aligned(64))) {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxTileConfig;

/* True when the CPU has AMX-BF16 (with the AVX-512 parts the kernels use around it), the
 * kernel granted this process the tile state, and SELFHOST_NO_AMX (../cpu_identity.py) does not
 * keep it off. */
static int amx_request(void) {
    const char *off = getenv("SELFHOST_NO_AMX");
    if (off != NULL && off[0] != '\0' && strcmp(off, "0") != 0) return 0;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bf16") ||
        !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16"))
        return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* Loads the one configuration where this thread's differs, and leaves it loaded: a unit of work
 * that loaded the configuration and released the tiles at its end spent ~1,000 cycles on the
 * pair (a 32-row product of a 125M model's layers: ~12% of its time, 5,800 units). Reading the
 * configuration back (STTILECFG) costs a few cycles, and a thread whose tiles something else
 * set up differently (a release, oneDNN) gets ours again. The price: a pool thread keeps 8 KiB
 * of tile state through context switches. */
AMX_TARGET static inline void amx_configure(void) {
    static const AmxTileConfig wanted = {
        .palette_id = 1,
        .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
        .rows = {AMX_TILE_ROWS, AMX_TILE_ROWS, AMX_TILE_ROWS, AMX_TILE_ROWS, AMX_TILE_ROWS, AMX_TILE_ROWS,
                 AMX_TILE_ROWS, AMX_TILE_ROWS},
    };
    AmxTileConfig current;
    _tile_storeconfig(&current);
    if (memcmp(&current, &wanted, sizeof wanted) != 0) _tile_loadconfig(&wanted);
}

/* The 16 lines of a 1 KB tile asked for ahead of the tile load that needs them: `hint` _MM_HINT_T0
 * (into L1) or _MM_HINT_T1 (L2). A tile load waits for all 16 of its lines; a product's first pass
 * over weights read from memory asks this a few tiles ahead. */
#define AMX_PREFETCH_TILE(tile, hint)                                                          \
    do {                                                                                       \
        for (int line_ = 0; line_ < 16; line_++) _mm_prefetch((const char *)(tile) + 64 * line_, hint); \
    } while (0)

/* Two rows of 16 bf16 each, a and b, as one tile row of 16 pairs (a[i], b[i]): the
 * "VNNI" order in which TDPBF16PS wants its B operand. */
AMX_TARGET static inline __m512i amx_pair_rows(const uint16_t *a, const uint16_t *b) {
    __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)a));
    __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)b));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

#endif
#endif
