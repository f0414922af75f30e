/*
 * Shared bits of the benchmark C tools (vu_client.c, vu_echo.c): wire constants,
 * little-endian field access, a buffered message reader and a whole-buffer sender.
 * Only libc; compiled with `cc -O2 -Wall -Wextra -Werror`.
 */
#ifndef VU_COMMON_H
#define VU_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vfio-user benchmark tools assume a little-endian host"
#endif

#define VU_HDR_SIZE 16u
#define VU_CMD_VERSION 1u
#define VU_CMD_DEVICE_GET_INFO 4u
#define VU_CMD_DEVICE_GET_REGION_INFO 5u
#define VU_CMD_DEVICE_GET_IRQ_INFO 7u
#define VU_CMD_REGION_READ 9u
#define VU_CMD_REGION_WRITE 10u

#define VU_FLAG_TYPE_MASK 0x0000000Fu
#define VU_FLAG_TYPE_COMMAND 0u
#define VU_FLAG_TYPE_REPLY 1u
#define VU_FLAG_NO_REPLY 0x00000010u
#define VU_FLAG_ERROR 0x00000020u

#define VU_MAX_DATA_XFER (1024u * 1024u)
/* Largest message either tool accepts: header + 16-byte access struct + data. */
#define VU_MAX_MSG (VU_MAX_DATA_XFER + 64u)

static inline uint16_t vu_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t vu_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t vu_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void vu_put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void vu_put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void vu_put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static inline void vu_put_hdr(uint8_t *p, uint16_t id, uint16_t cmd, uint32_t size,
                              uint32_t flags, uint32_t error)
{
    vu_put16(p, id);
    vu_put16(p + 2, cmd);
    vu_put32(p + 4, size);
    vu_put32(p + 8, flags);
    vu_put32(p + 12, error);
}

/*
 * Buffered reader: one recv() fills as much as the kernel has queued; messages are
 * cut out by msg_size. Handles messages split over any number of reads.
 */
struct vu_reader {
    int fd;
    int epfd; /* >= 0: wait in epoll_wait, then recv without blocking (an event loop's calls) */
    uint8_t *buf;
    size_t cap, start, end;
};

static inline int vu_reader_init(struct vu_reader *r, int fd, size_t cap)
{
    r->fd = fd;
    r->epfd = -1;
    r->buf = malloc(cap);
    r->cap = cap;
    r->start = r->end = 0;
    return r->buf ? 0 : -1;
}

/*
 * Next whole message. Returns its size (>= 16) and sets *msg; 0 on clean EOF at a
 * message boundary; -1 on error with a message in err (EOF mid-message, size out of
 * range, recv failure).
 */
static inline ssize_t vu_read_msg(struct vu_reader *r, uint8_t **msg, const char **err)
{
    for (;;) {
        size_t have = r->end - r->start;
        size_t need = VU_HDR_SIZE;
        if (have >= VU_HDR_SIZE) {
            uint32_t size = vu_get32(r->buf + r->start + 4);
            if (size < VU_HDR_SIZE) { *err = "msg_size < 16 (corrupt stream)"; return -1; }
            if (size > r->cap) { *err = "msg_size larger than this tool accepts"; return -1; }
            if (have >= size) {
                *msg = r->buf + r->start;
                r->start += size;
                if (r->start == r->end) r->start = r->end = 0;
                return (ssize_t)size;
            }
            need = size;
        }
        if (r->start + need > r->cap) { /* compact: partial message to the front */
            memmove(r->buf, r->buf + r->start, have);
            r->start = 0;
            r->end = have;
        }
        if (r->epfd >= 0) {
            struct epoll_event ev;
            if (epoll_wait(r->epfd, &ev, 1, -1) < 0) {
                if (errno == EINTR) continue;
                *err = strerror(errno);
                return -1;
            }
        }
        ssize_t n = recv(r->fd, r->buf + r->end, r->cap - r->end, r->epfd >= 0 ? MSG_DONTWAIT : 0);
        if (n > 0) { r->end += (size_t)n; continue; }
        if (n < 0 && errno == EAGAIN && r->epfd >= 0) continue;
        if (n == 0) {
            if (have == 0) return 0;
            *err = "peer closed the connection in the middle of a message";
            return -1;
        }
        if (errno == EINTR) continue;
        *err = strerror(errno);
        return -1;
    }
}

/* Send a whole message: one send() (a blocking AF_UNIX stream takes it whole). */
static inline int vu_send_all(int fd, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

#endif
