# `find_package(pqkv)` support: headers, the library and a package config.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS pqkv EXPORT pqkvTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/pqkv DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT pqkvTargets NAMESPACE pqkv:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)
configure_package_config_file(cmake/pqkvConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pqkvConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)

# pkg-config, for builds without CMake:
#   cc app.c $(pkg-config --cflags --libs pqkv)   (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
file(RELATIVE_PATH PQKV_PC_UP /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
string(REGEX REPLACE "/$" "" PQKV_PC_UP "${PQKV_PC_UP}")
configure_file(cmake/pqkv.pc.in ${CMAKE_CURRENT_BINARY_DIR}/pqkv.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pqkv.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
