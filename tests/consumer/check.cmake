# Installs pqkv into a scratch prefix, then, against it: runs the installed
# `pqkv --help`, and configures, builds and runs the consumer project and
# examples/cpp with the compiler's default flags. Run by ctest with
# -DBUILD_DIR, -DSOURCE_DIR and -DCXX_COMPILER.
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
                quickstart:${SOURCE_DIR}/examples/cpp:quickstart)
  string(REPLACE ":" ";" fields ${project})
  list(GET fields 0 name)
  list(GET fields 1 source)
  list(GET fields 2 program)
  run("configuring ${name} against the installed package"
      ${CMAKE_COMMAND} -S ${source} -B ${work}/${name} -DCMAKE_PREFIX_PATH=${prefix}
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
  run("building ${name}" ${CMAKE_COMMAND} --build ${work}/${name})
  run("running ${name}" ${work}/${name}/${program})
  message(STATUS "${name}:\n${output}")
endforeach()
