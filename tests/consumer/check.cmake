# Installs pqkv into a scratch prefix, then, against it: runs the installed
# `pqkv --help`; configures, builds and runs the consumer project,
# examples/cpp and examples/c with the compilers' default flags; and compiles
# examples/c with the C compiler alone, its flags from the installed
# pkg-config file. Run by ctest with -DBUILD_DIR, -DSOURCE_DIR,
# -DCXX_COMPILER, -DC_COMPILER and -DPKG_CONFIG.
set(work ${BUILD_DIR}/consumer-check)
set(prefix ${work}/prefix)
file(REMOVE_RECURSE ${work})

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(rc)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}")
  endif()
  set(output "${out}" PARENT_SCOPE)
endfunction()

run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# The command runs from its prefix, with no library path set.
set(ENV{LD_LIBRARY_PATH} "")
run("${prefix}/bin/pqkv --help" ${prefix}/bin/pqkv --help)
if(NOT output MATCHES "bench")
  message(FATAL_ERROR "pqkv --help did not list its commands:\n${output}")
endif()

foreach(project consumer:${SOURCE_DIR}/tests/consumer:consumer
                quickstart:${SOURCE_DIR}/examples/cpp:quickstart
                quickstart_c:${SOURCE_DIR}/examples/c:quickstart_c)
  string(REPLACE ":" ";" fields ${project})
  list(GET fields 0 name)
  list(GET fields 1 source)
  list(GET fields 2 program)
  run("configuring ${name} against the installed package"
      ${CMAKE_COMMAND} -S ${source} -B ${work}/${name} -DCMAKE_PREFIX_PATH=${prefix}
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
      -DCMAKE_C_COMPILER=${C_COMPILER} --no-warn-unused-cli)
  run("building ${name}" ${CMAKE_COMMAND} --build ${work}/${name})
  run("running ${name}" ${work}/${name}/${program})
  message(STATUS "${name}:\n${output}")
endforeach()

# Without CMake: the flags pkg-config gives, and the prefix's lib/ as the
# program's run path (a prefix outside the loader's path needs one).
set(ENV{PKG_CONFIG_PATH} ${prefix}/lib/pkgconfig)
run("pkg-config --cflags --libs pqkv" ${PKG_CONFIG} --cflags --libs pqkv)
separate_arguments(flags UNIX_COMMAND "${output}")
run("pkg-config --variable=libdir pqkv" ${PKG_CONFIG} --variable=libdir pqkv)
string(STRIP "${output}" libdir)
run("compiling examples/c/quickstart.c with pkg-config's flags"
    ${C_COMPILER} ${SOURCE_DIR}/examples/c/quickstart.c ${flags} -lm -Wl,-rpath,${libdir}
    -o ${work}/quickstart_c_pkgconfig)
run("running the pkg-config build of quickstart_c" ${work}/quickstart_c_pkgconfig)
message(STATUS "quickstart_c (pkg-config):\n${output}")
