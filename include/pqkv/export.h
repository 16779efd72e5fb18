/* PQKV_API marks what libpqkv exports: the classes and functions of the public
 * headers and the C API. The library is built with hidden visibility, so a
 * public declaration without PQKV_API is not reachable from the shared
 * library. Plain C, for pqkv.h. */
#ifndef PQKV_EXPORT_H_
#define PQKV_EXPORT_H_

#if defined(_WIN32)
#define PQKV_API
#define PQKV_HIDDEN
#elif defined(__cplusplus)
/* The standard attribute form: it may follow another one, as in
   `class [[nodiscard]] PQKV_API Status`. */
#define PQKV_API [[gnu::visibility("default")]]
/* For what a PQKV_API class declares but keeps to itself (its Impl), which
   would otherwise be exported with the class. */
#define PQKV_HIDDEN [[gnu::visibility("hidden")]]
#else
#define PQKV_API __attribute__((visibility("default")))
#endif

#endif /* PQKV_EXPORT_H_ */
