/* Included at the top of an ISA file with QG_TARGET defined to a target string: every function
 * of the file is compiled for that ISA, whatever the global compiler flags (one binary runs
 * everywhere; the core only calls a file's functions after CPU feature detection). */
#if defined(__clang__)
#define QG_PRAGMA_(x) _Pragma(#x)
#define QG_PRAGMA(x) QG_PRAGMA_(x)
QG_PRAGMA(clang attribute push(__attribute__((target(QG_TARGET))), apply_to = function))
#elif defined(__GNUC__)
#define QG_PRAGMA_(x) _Pragma(#x)
#define QG_PRAGMA(x) QG_PRAGMA_(x)
#pragma GCC push_options
QG_PRAGMA(GCC target(QG_TARGET))
#endif
