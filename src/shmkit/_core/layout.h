/* layout.h - the shared layouts every process must agree on, declared once.
 *
 * The segment header and the attach-table entry live here; the ring's header
 * is in ring.h.  Each offset is pinned by a _Static_assert, and module.c
 * exports them (with the format versions) as _core.layouts, from which the
 * Python code and the docs' tables are checked.  Changing any of them means
 * bumping the format version it belongs to.
 */
#ifndef SHMKIT_LAYOUT_H
#define SHMKIT_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define SHM_SEGMENT_FORMAT 1   /* segment.py FORMAT_VERSION */
#define SHM_HEADER_BYTES 4096  /* the attach table starts here */
#define SHM_LAYOUT_OFF 1024    /* layout JSON */
#define SHM_MAX_RESERVE (1ull << 46) /* the largest max_size a header may claim: 64 TiB */

/* The segment header (native byte order), at offset 0 of the file. */
struct shm_segment_hdr {
    char magic[8];         /* b"\x89SHMKIT\0", written last when created */
    uint32_t version;      /* SHM_SEGMENT_FORMAT */
    uint32_t kind;
    uint32_t flags;        /* bit 0: removed when the last attachment closes */
    uint32_t max_slots;    /* attach-table slots */
    uint64_t hdr_size;     /* offset of the payload */
    uint64_t size;         /* payload bytes in use */
    uint64_t max_size;     /* payload bytes reserved in every mapping */
    uint64_t created;      /* wall-clock ns */
    uint32_t creator;      /* pid of the creating process */
    uint32_t lock;         /* the segment's robust mutex */
    uint32_t resizes;      /* how many times the payload was resized */
    uint32_t hwm;          /* highest attach slot ever used + 1 */
    uint32_t layout_len;   /* bytes of layout JSON at SHM_LAYOUT_OFF */
};
_Static_assert(offsetof(struct shm_segment_hdr, magic) == 0, "magic");
_Static_assert(offsetof(struct shm_segment_hdr, version) == 8, "version");
_Static_assert(offsetof(struct shm_segment_hdr, kind) == 12, "kind");
_Static_assert(offsetof(struct shm_segment_hdr, flags) == 16, "flags");
_Static_assert(offsetof(struct shm_segment_hdr, max_slots) == 20, "max_slots");
_Static_assert(offsetof(struct shm_segment_hdr, hdr_size) == 24, "hdr_size");
_Static_assert(offsetof(struct shm_segment_hdr, size) == 32, "size");
_Static_assert(offsetof(struct shm_segment_hdr, max_size) == 40, "max_size");
_Static_assert(offsetof(struct shm_segment_hdr, created) == 48, "created");
_Static_assert(offsetof(struct shm_segment_hdr, creator) == 56, "creator");
_Static_assert(offsetof(struct shm_segment_hdr, lock) == 60, "lock");
_Static_assert(offsetof(struct shm_segment_hdr, resizes) == 64, "resizes");
_Static_assert(offsetof(struct shm_segment_hdr, hwm) == 68, "hwm");
_Static_assert(offsetof(struct shm_segment_hdr, layout_len) == 72, "layout_len");
_Static_assert(sizeof(struct shm_segment_hdr) == 80, "header struct");

/* One attach-table entry (SHM_SLOT_SIZE bytes), at
 * SHM_HEADER_BYTES + slot * SHM_SLOT_SIZE. */
struct shm_attach_entry {
    uint32_t gen;          /* bumped by every new owner; low 20 bits in tokens */
    uint32_t pid;
    uint64_t attached;     /* wall-clock ns */
    uint64_t pad;
    char comm[16];         /* the process's name, NUL-padded */
    char pad2[24];
};
_Static_assert(offsetof(struct shm_attach_entry, gen) == 0, "gen");
_Static_assert(offsetof(struct shm_attach_entry, pid) == 4, "pid");
_Static_assert(offsetof(struct shm_attach_entry, attached) == 8, "attached");
_Static_assert(offsetof(struct shm_attach_entry, comm) == 24, "comm");
_Static_assert(sizeof(struct shm_attach_entry) == 64, "entry size");

#endif
