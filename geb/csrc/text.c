/* Shingle hashes for the data pipeline's MinHash step (geb/data/minhash.py), in one call per document.
 *
 * datatrove hashes every shingle (n tokens joined by single spaces) with a Python sha1 call; on the
 * pipeline's bench corpus that was a third of the MinHash signature time. Here the caller passes the
 * document's tokens already joined by single spaces (no token contains U+0020), so each shingle is a
 * contiguous byte range of that buffer: token i's first byte to token i+n-1's last. Each distinct
 * window is hashed once with SHA-1 (as datatrove hashes the set of shingles), its first 8 (or 4)
 * digest bytes read little-endian, as datatrove's sha1_hash64/32 do.
 *
 * Portable C (no ISA variants: SHA-1 on ~12-byte messages is a small share of the step).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint32_t rol(uint32_t x, int s) { return (x << s) | (x >> (32 - s)); }

#define SHA1_ROUND(f, k)                          \
  do {                                            \
    uint32_t t = rol(a, 5) + (f) + e + (k) + w[i]; \
    e = d;                                        \
    d = c;                                        \
    c = rol(b, 30);                               \
    b = a;                                        \
    a = t;                                        \
  } while (0)

static void sha1_block(uint32_t st[5], const uint8_t *p) {
  uint32_t w[80];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
  uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4];
  /* four loops of 20, not one loop with a branch per round: the compiler unrolls each */
  for (int i = 0; i < 20; i++) SHA1_ROUND(d ^ (b & (c ^ d)), 0x5A827999u);
  for (int i = 20; i < 40; i++) SHA1_ROUND(b ^ c ^ d, 0x6ED9EBA1u);
  for (int i = 40; i < 60; i++) SHA1_ROUND((b & c) | (d & (b | c)), 0x8F1BBCDCu);
  for (int i = 60; i < 80; i++) SHA1_ROUND(b ^ c ^ d, 0xCA62C1D6u);
  st[0] += a;
  st[1] += b;
  st[2] += c;
  st[3] += d;
  st[4] += e;
}

/* The first 8 bytes of SHA-1(msg[0..len)) read little-endian (digest words 0 and 1, big-endian each). */
static uint64_t sha1_head64(const uint8_t *msg, int64_t len) {
  uint32_t st[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
  int64_t off = 0;
  for (; len - off >= 64; off += 64) sha1_block(st, msg + off);
  uint8_t tail[128];
  int64_t r = len - off;
  memcpy(tail, msg + off, (size_t)r);
  tail[r] = 0x80;
  int64_t total = r + 1 + 8 <= 64 ? 64 : 128;
  memset(tail + r + 1, 0, (size_t)(total - r - 1));
  uint64_t bits = (uint64_t)len * 8;
  for (int i = 0; i < 8; i++) tail[total - 1 - i] = (uint8_t)(bits >> (8 * i));
  sha1_block(st, tail);
  if (total == 128) sha1_block(st, tail + 64);
  uint64_t out = 0;  /* digest bytes 0..7 = st[0] and st[1] big-endian; as a little-endian uint64 */
  for (int i = 0; i < 4; i++) out |= (uint64_t)((st[0] >> (24 - 8 * i)) & 0xFF) << (8 * i);
  for (int i = 0; i < 4; i++) out |= (uint64_t)((st[1] >> (24 - 8 * i)) & 0xFF) << (8 * (i + 4));
  return out;
}

/* FNV-1a over a byte range: the key of the table that finds repeated shingles (not the shingle hash) */
static inline uint64_t fnv1a(const uint8_t *p, int64_t len) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (int64_t i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h ^ (h >> 29);
}

/* SHA-1 heads of the distinct windows of n space-separated tokens in buf[0..nbytes) into out, in order
 * of first appearance (at most cap values; width 8 or 4 bytes of the digest). A repeated window is
 * hashed once: long documents repeat most of their character n-grams, and SHA-1 is the step's cost.
 * Returns the number of distinct windows (0 when there are fewer than n tokens), -1 for bad
 * arguments, -2 when out is too small, -3 when memory runs out. */
int64_t geb_shingle_hashes(const uint8_t *buf, int64_t nbytes, int64_t n, int64_t width, uint64_t *out,
                           int64_t cap) {
  if (nbytes < 0 || n < 1 || (width != 8 && width != 4) || cap < 0) return -1;
  if (nbytes == 0) return 0;
  int64_t tokens = 1;
  for (int64_t i = 0; i < nbytes; i++) tokens += buf[i] == ' ';
  if (tokens < n) return 0;
  const int64_t windows = tokens - n + 1;
  int64_t slots = 16;
  while (slots < 2 * windows) slots *= 2;
  /* start[j]: token j's first byte; token j ends at start[j+1] - 1. table: window index + 1, 0 = empty */
  int64_t *start = malloc((size_t)(tokens + 1) * sizeof *start);
  int64_t *table = calloc((size_t)slots, sizeof *table);
  if (!start || !table) {
    free(start);
    free(table);
    return -3;
  }
  int64_t t = 0;
  start[t++] = 0;
  for (int64_t i = 0; i < nbytes; i++)
    if (buf[i] == ' ') start[t++] = i + 1;
  start[t] = nbytes + 1; /* as if a space followed the last token */
  const uint64_t keep = width == 8 ? ~0ULL : 0xFFFFFFFFULL;
  int64_t found = 0, rc = 0;
  for (int64_t i = 0; i < windows; i++) {
    const int64_t a = start[i], len = start[i + n] - 1 - a;
    int64_t s = (int64_t)(fnv1a(buf + a, len) & (uint64_t)(slots - 1));
    int seen = 0;
    for (; table[s]; s = (s + 1) & (slots - 1)) {
      const int64_t j = table[s] - 1, b = start[j];
      if (start[j + n] - 1 - b == len && memcmp(buf + a, buf + b, (size_t)len) == 0) {
        seen = 1;
        break;
      }
    }
    if (seen) continue;
    table[s] = i + 1;
    if (found == cap) {
      rc = -2;
      break;
    }
    out[found++] = sha1_head64(buf + a, len) & keep;
  }
  free(start);
  free(table);
  return rc ? rc : found;
}
